"""T5 decoding with the key/value cache: the same tokens as recomputing the
decoder every step, the gathered MLP path taken by the `"auto"` rule, EOS,
sampling, XLA and mixed precision, argument checks; on every backend
(two-stage scoring in decoding: test_scoring.py; the decoding benchmark:
test_benchmarks.py).

Random T5 weights decode one token over and over (the tied embedding makes
each step copy the token it reads), which would make cache bugs invisible:
`_weights` shrinks the embedding and widens the blocks' kernels so that the
greedy tokens vary along a sequence and between sequences.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import backend
from tests.backend import BACKEND, numpy
from topk_sparse import ops
from topk_sparse.models import (MAX_GENERATE_LENGTH, T5,
                                RelativePositionBias, TransformerBlock, ViT)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 20
LENGTH = 9  # tokens generated
K = 16  # of T5 tiny's mlp_dim 256: the gathered path up to 2 tokens per call


def varied_weights(model):
    """Weights for a T5 "tiny" of VOCAB tokens whose greedy tokens vary
    (see the module docstring), from numpy alone: the same on every
    backend (norm scales stay ones, counts zeros)."""
    kernels = np.random.default_rng(5)
    embedding = np.random.default_rng(102)
    values = []
    for variable, value in zip(model.weights, model.get_weights()):
        if "token_embedding" in variable.path:
            value = 0.05 * embedding.normal(size=value.shape)
        elif value.ndim == 2:
            value = kernels.normal(size=value.shape) * 3 / np.sqrt(
                value.shape[0])
        values.append(value.astype("float32"))
    return values


@pytest.fixture(scope="module")
def weights():
    return varied_weights(T5("tiny", vocab_size=VOCAB, dropout_rate=0.0))


@pytest.fixture(scope="module")
def source():
    return np.random.default_rng(1).integers(
        1, VOCAB, size=(4, 6)).astype("int32")


def _t5(weights, **kwargs):
    model = T5("tiny", vocab_size=VOCAB, dropout_rate=0.0, **kwargs)
    model.set_weights(weights)
    return model


def _compiled_generate(model, mode, **kwargs):
    """`tokens -> model.generate(tokens, LENGTH, **kwargs)` run as `mode`
    says (`tests.backend.MODES`); on JAX, inside `jax.jit` over the
    model's variables, as keras-hub compiles its generate."""
    return backend.compiled_with_state(
        lambda tokens: model.generate(tokens, LENGTH, **kwargs),
        model.variables, mode)


# The Python loop body runs once per step on TensorFlow (eager
# `tf.while_loop`), once in all on JAX (`jax.lax.while_loop` traces it).
BODY_RUNS = LENGTH if BACKEND == "tensorflow" else 1


def _check_varied(tokens):
    """The greedy tokens change along a sequence and between sequences, so
    that equal outputs mean something."""
    tokens = np.asarray(tokens)
    assert len({tuple(row) for row in tokens}) == len(tokens)
    assert all(len(set(row)) >= 3 for row in tokens)


# The cache gives the tokens of recomputation ---------------------------------

@pytest.mark.parametrize("k", [None, K], ids=["dense", "topk"])
def test_cache_gives_the_tokens_of_recomputation(weights, source, k):
    model = _t5(weights, k=k, method="exact")
    cached = model.generate(source, LENGTH)
    assert cached.shape == (4, LENGTH)
    assert keras.backend.standardize_dtype(cached.dtype) == "int32"
    cached = numpy(cached)
    _check_varied(cached)
    np.testing.assert_array_equal(
        cached, numpy(model.generate(source, LENGTH, use_cache=False)))
    # Greedy: each token is the argmax of the teacher-forced logits.
    decoder_tokens = np.pad(cached[:, :-1], [[0, 0], [1, 0]])
    logits = model({"encoder_tokens": source,
                    "decoder_tokens": decoder_tokens})
    np.testing.assert_array_equal(np.argmax(numpy(logits), -1), cached)


def test_masked_and_gathered_mlps_decode_alike(weights, source):
    tokens = {implementation: _t5(weights, k=K, method="exact",
                                  implementation=implementation)
              .generate(source[:2], LENGTH)
              for implementation in ("masked", "gather", "auto")}
    tokens = {name: numpy(value) for name, value in tokens.items()}
    _check_varied(tokens["masked"])
    np.testing.assert_array_equal(tokens["gather"], tokens["masked"])
    np.testing.assert_array_equal(tokens["auto"], tokens["masked"])


def _count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_cached_decoding_gathers_by_the_auto_rule(weights, source,
                                                  monkeypatch):
    # Eager calls: each gathered MLP call runs sparse_mlp_product once (per
    # run of the loop body, BODY_RUNS). At batch 2 the decoder MLPs read
    # 2 x 16 rows of 256 (at most a sixth): gathered; the encoder's (6
    # tokens) and the cache-free decoder's (9 tokens) read more: masked.
    model = _t5(weights, k=K)
    gathered = _count_calls(monkeypatch, ops, "sparse_mlp_product")
    model.generate(source[:2], LENGTH)
    assert len(gathered) == model.depth * BODY_RUNS
    gathered.clear()
    model.generate(source[:2], LENGTH, use_cache=False)
    assert not gathered
    # At batch 4, 4 x 16 rows is more than a sixth of 256: masked.
    model.generate(source, LENGTH)
    assert not gathered


def test_one_k_per_mlp_decodes_alike_and_gathers_per_layer(
        weights, source, monkeypatch):
    # Encoder 16 and 32, decoder 8 and 32: at batch 2 the first decoder
    # MLP reads 2 x 8 rows of 256 (gathered), the second 2 x 32 (masked).
    ks = [16, 32, 8, 32]
    tokens = {implementation: numpy(_t5(
        weights, k=ks, method="exact", implementation=implementation)
        .generate(source[:2], LENGTH))
        for implementation in ("masked", "gather")}
    _check_varied(tokens["masked"])
    np.testing.assert_array_equal(tokens["gather"], tokens["masked"])
    model = _t5(weights, k=ks, method="exact")
    gathered = _count_calls(monkeypatch, ops, "sparse_mlp_product")
    np.testing.assert_array_equal(
        numpy(model.generate(source[:2], LENGTH)), tokens["masked"])
    assert len(gathered) == 1 * BODY_RUNS


def test_block_decode_matches_its_causal_call():
    block = TransformerBlock(num_heads=2, mlp_dim=32, k=4, norm="rms",
                             use_bias=False, causal=True,
                             cross_attention=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    context = rng.normal(size=(2, 3, 8)).astype("float32")
    context_mask = np.array([[True, True, False], [True, True, True]])
    bias_layer = RelativePositionBias(2, bidirectional=False)
    bias = bias_layer(x)
    expected = numpy(block(x, context=context, attention_bias=bias,
                           context_padding_mask=context_mask))
    zeros = keras.ops.zeros((2, 2, 5, 4))
    cache = (zeros, zeros)
    context_cache = block.context_keys_and_values(context)
    positions = keras.ops.arange(5)
    for i in range(5):
        np.testing.assert_allclose(numpy(bias_layer.bias_at(i, 5)),
                                   numpy(bias)[:, :, i:i + 1])
        y, cache = block.decode(x[:, i:i + 1], cache, positions == i,
                                positions <= i, bias_layer.bias_at(i, 5),
                                context_cache, context_mask)
        np.testing.assert_allclose(numpy(y)[:, 0], expected[:, i],
                                   rtol=1e-5, atol=1e-5)


# Execution modes and precision -----------------------------------------------

def test_eager_function_and_xla_decode_alike(weights, source):
    model = _t5(weights, k=K)
    eager = numpy(model.generate(source[:2], LENGTH, eos_id=3))
    for mode in ("function", "jit"):
        traced = _compiled_generate(model, mode, eos_id=3)
        np.testing.assert_array_equal(numpy(traced(source[:2])), eager)
    if BACKEND == "tensorflow":  # JAX traces every call on static shapes
        import tensorflow as tf
        # An unknown batch size: the masked path, the same tokens.
        unknown = tf.function(
            lambda tokens: model.generate(tokens, LENGTH, eos_id=3),
            input_signature=[tf.TensorSpec([None, None], tf.int32)])
        np.testing.assert_array_equal(unknown(source[:2]), eager)


def test_mixed_bfloat16_decodes(weights, source):
    model = _t5(weights, k=K, dtype="mixed_bfloat16")
    assert model.decoder_blocks[0].compute_dtype == "bfloat16"
    sampling = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 1}
    for mode, kwargs in (("eager", {}), ("eager", sampling),
                         ("jit", sampling)):
        tokens = numpy(_compiled_generate(model, mode, **kwargs)(source[:2]))
        assert tokens.shape == (2, LENGTH) and tokens.dtype == np.int32
        assert ((tokens >= 0) & (tokens < VOCAB)).all()


# End of sequence -------------------------------------------------------------

def test_eos_stops_rows_pads_them_and_ends_the_loop(weights, source):
    model = _t5(weights, k=K)
    free = numpy(model.generate(source, LENGTH))
    eos = int(free[0, 5])  # a token that row 0 emits late
    stopped = numpy(model.generate(source, LENGTH, eos_id=eos))
    for row, tokens in zip(free, stopped):
        ends = np.flatnonzero(row == eos)
        end = ends[0] + 1 if len(ends) else LENGTH
        np.testing.assert_array_equal(tokens[:end], row[:end])
        assert (tokens[end:] == 0).all()
    # Once every row has emitted it, no more steps run: a decoder MLP
    # counts one token per step.
    counted = model.decoder_blocks[0].mlp.nonzero_fraction.token_count
    row = free[:1]
    first = int(np.flatnonzero(row[0] == row[0, 2])[0])
    before = float(counted.numpy())
    tokens = model.generate(source[:1], LENGTH, eos_id=int(row[0, 2]))
    assert float(counted.numpy()) - before == first + 1 < LENGTH
    assert (numpy(tokens)[0, first + 1:] == 0).all()


# Sampling --------------------------------------------------------------------

def test_sampling_is_seeded(weights, source):
    model = _t5(weights, k=K)
    first = numpy(model.generate(source, LENGTH, temperature=1.0, seed=7))
    np.testing.assert_array_equal(
        numpy(model.generate(source, LENGTH, temperature=1.0, seed=7)), first)
    traced = _compiled_generate(model, "function", temperature=1.0,
                                seed=[7, 0])
    np.testing.assert_array_equal(numpy(traced(source)), first)
    assert (numpy(model.generate(source, LENGTH, temperature=1.0, seed=8))
            != first).any()
    assert (first != numpy(model.generate(source, LENGTH))).any()


@pytest.mark.parametrize("kwargs", [
    {"temperature": 1e-4}, {"temperature": 1.0, "top_k": 1},
    {"temperature": 2.0, "top_p": 1e-6}])
def test_sampling_limits_are_greedy(weights, source, kwargs):
    model = _t5(weights, k=K)
    np.testing.assert_array_equal(
        numpy(model.generate(source, LENGTH, seed=3, **kwargs)),
        numpy(model.generate(source, LENGTH)))


def test_sampled_tokens_respect_top_k_and_top_p(weights, source):
    model = _t5(weights, k=K)
    for kwargs in ({"top_k": 3}, {"top_p": 0.5}):
        tokens = numpy(model.generate(source, LENGTH, temperature=1.5,
                                      seed=5, **kwargs))
        logits = numpy(model({"encoder_tokens": source,
                              "decoder_tokens": np.pad(
                                  tokens[:, :-1], [[0, 0], [1, 0]])})) / 1.5
        order = np.argsort(-logits, axis=-1)
        rank = np.argmax(order == tokens[..., None], axis=-1)
        if "top_k" in kwargs:
            assert (rank < 3).all()
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs = np.take_along_axis(probs / probs.sum(-1, keepdims=True),
                                       order, -1)
            before = np.cumsum(probs, -1) - probs  # mass of likelier tokens
            assert (np.take_along_axis(before, rank[..., None], -1)
                    < 0.5).all()


# Arguments -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"max_length": 0}, "max_length must be a positive int"),
    ({"max_length": -3}, "max_length"),
    ({"max_length": 2.0}, "max_length"),
    ({"max_length": MAX_GENERATE_LENGTH + 1},
     f"no larger than {MAX_GENERATE_LENGTH}"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, r"top_k must be an int in \[0, 20\]"),
    ({"top_k": VOCAB + 1}, "top_k"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p"),
    ({"eos_id": VOCAB}, r"eos_id must be an int in \[0, 19\]"),
    ({"seed": [1, 2, 3]}, "seed must be None, an int or a pair of ints"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "abc"}, "seed"),
    ({"encoder_tokens": np.ones(3, "int32")}, r"\[batch, source_length\]"),
    ({"encoder_tokens": np.ones((1, 3), "float32")},
     "must be integer token ids, got dtype float32"),
    ({"encoder_tokens": np.full((1, 3), VOCAB, "int32")},
     r"ids outside \[0, 20\) \(the vocab_size\): min 20, max 20"),
    ({"encoder_tokens": keras.ops.convert_to_tensor([[1, -1]])},
     r"ids outside \[0, 20\)"),
])
def test_bad_arguments_raise(weights, kwargs, match):
    model = _t5(weights)
    kwargs = {"encoder_tokens": np.ones((1, 3), "int32"), "max_length": 2,
              **kwargs}
    with pytest.raises(ValueError, match=match) as error:
        model.generate(**kwargs)
    assert "\n" not in str(error.value)


# Portable files: one backend writes, the other loads -------------------------

def outputs_of_saved_models(directory):
    """`{name: numpy}`: ViT logits, T5 logits and greedy tokens (with and
    without the cache) of the models saved in `directory`, loaded and run
    on this process's backend."""
    images = np.random.default_rng(4).normal(size=(3, 16, 16, 3)).astype(
        "float32")
    source = np.random.default_rng(1).integers(1, VOCAB, (4, 6)).astype(
        "int32")
    vit = keras.saving.load_model(os.path.join(directory, "vit.keras"))
    t5 = keras.saving.load_model(os.path.join(directory, "t5.keras"))
    return {
        "vit/logits": numpy(vit(images)),
        "t5/logits": numpy(t5({"encoder_tokens": source,
                               "decoder_tokens": source})),
        "t5/tokens": numpy(t5.generate(source, LENGTH)),
        "t5/tokens_without_cache": numpy(t5.generate(source, LENGTH,
                                                     use_cache=False)),
    }


def test_keras_files_load_on_the_other_backend(weights, tmp_path):
    """A `.keras` written here loads under the other Keras backend (a
    subprocess) with the same outputs and the same greedy tokens."""
    ViT("micro", image_size=16, num_classes=4, k=8, method="exact").save(
        tmp_path / "vit.keras")
    t5 = _t5(weights, k=K, method="exact")
    _check_varied(numpy(t5.generate(np.random.default_rng(1).integers(
        1, VOCAB, (4, 6)).astype("int32"), LENGTH)))
    t5.save(tmp_path / "t5.keras")
    other = {"tensorflow": "jax", "jax": "tensorflow"}[backend.BACKEND]
    subprocess.run(
        [sys.executable, "-c",
         "import sys, numpy as np\n"
         "from tests.test_generate import outputs_of_saved_models\n"
         "np.savez(sys.argv[2], **outputs_of_saved_models(sys.argv[1]))",
         str(tmp_path), str(tmp_path / "other.npz")],
        check=True, timeout=300,
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": other})
    theirs = dict(np.load(tmp_path / "other.npz"))
    ours = outputs_of_saved_models(str(tmp_path))
    for key, value in ours.items():
        if "tokens" in key:
            np.testing.assert_array_equal(value, theirs[key], err_msg=key)
        else:
            np.testing.assert_allclose(value, theirs[key], rtol=1e-4,
                                       atol=1e-4, err_msg=key)
