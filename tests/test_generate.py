"""T5 decoding with the key/value cache: the same tokens as recomputing the
decoder every step, the gathered MLP path taken by the `"auto"` rule, EOS,
sampling, XLA and mixed precision, argument checks, and the decoding
benchmark on tiny shapes.

Random T5 weights decode one token over and over (the tied embedding makes
each step copy the token it reads), which would make cache bugs invisible:
`_weights` shrinks the embedding and widens the blocks' kernels so that the
greedy tokens vary along a sequence and between sequences.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from topk_sparse import ops, scoring
from topk_sparse.models import (MAX_GENERATE_LENGTH, T5,
                                RelativePositionBias, TransformerBlock)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 20
LENGTH = 9  # tokens generated
K = 16  # of T5 tiny's mlp_dim 256: the gathered path up to 2 tokens per call


@pytest.fixture(scope="module")
def weights():
    keras.utils.set_random_seed(0)
    model = T5("tiny", vocab_size=VOCAB, dropout_rate=0.0)
    rng = np.random.default_rng(3)
    values = []
    for variable, value in zip(model.weights, model.get_weights()):
        if "token_embedding" in variable.path:
            value = 0.05 * value
        elif value.ndim == 2:
            value = (rng.normal(size=value.shape) * 3 / np.sqrt(
                value.shape[0])).astype("float32")
        values.append(value)
    return values


@pytest.fixture(scope="module")
def source():
    return np.random.default_rng(1).integers(
        1, VOCAB, size=(4, 6)).astype("int32")


def _t5(weights, **kwargs):
    model = T5("tiny", vocab_size=VOCAB, dropout_rate=0.0, **kwargs)
    model.set_weights(weights)
    return model


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
    assert cached.shape == (4, LENGTH) and cached.dtype == tf.int32
    _check_varied(cached)
    np.testing.assert_array_equal(
        cached, model.generate(source, LENGTH, use_cache=False))
    # Greedy: each token is the argmax of the teacher-forced logits.
    decoder_tokens = np.pad(cached.numpy()[:, :-1], [[0, 0], [1, 0]])
    logits = model({"encoder_tokens": source,
                    "decoder_tokens": decoder_tokens})
    np.testing.assert_array_equal(np.argmax(logits, -1), cached)


def test_masked_and_gathered_mlps_decode_alike(weights, source):
    tokens = {implementation: _t5(weights, k=K, method="exact",
                                  implementation=implementation)
              .generate(source[:2], LENGTH).numpy()
              for implementation in ("masked", "gather", "auto")}
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
    # Eager calls: each gathered MLP call runs sparse_mlp_product once. At
    # batch 2 the decoder MLPs read 2 x 16 rows of 256 (at most a sixth):
    # gathered; the encoder's (6 tokens) and the cache-free decoder's
    # (9 tokens) read more: masked.
    model = _t5(weights, k=K)
    gathered = _count_calls(monkeypatch, ops, "sparse_mlp_product")
    model.generate(source[:2], LENGTH)
    assert len(gathered) == model.depth * LENGTH
    gathered.clear()
    model.generate(source[:2], LENGTH, use_cache=False)
    assert not gathered
    # At batch 4, 4 x 16 rows is more than a sixth of 256: masked.
    model.generate(source, LENGTH)
    assert not gathered


def test_calibrated_two_stage_scoring_runs_in_cached_decoding(
        weights, source, monkeypatch):
    model = _t5(weights, k=K)
    batches = [{"encoder_tokens": source, "decoder_tokens": source}] * 4
    scoring.calibrate(model, batches, rank=8, candidates=K)
    scored = _count_calls(monkeypatch, scoring.TwoStageScorer, "topk")
    tokens = model.generate(source[:1], LENGTH)
    assert len(scored) == model.depth * LENGTH
    assert tokens.shape == (1, LENGTH)


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
    expected = block(x, context=context, attention_bias=bias,
                     context_padding_mask=context_mask).numpy()
    zeros = tf.zeros([2, 2, 5, 4])
    cache = (zeros, zeros)
    context_cache = block.context_keys_and_values(context)
    positions = tf.range(5)
    for i in range(5):
        np.testing.assert_allclose(bias_layer.bias_at(i, 5),
                                   bias[:, :, i:i + 1])
        y, cache = block.decode(x[:, i:i + 1], cache, positions == i,
                                positions <= i, bias_layer.bias_at(i, 5),
                                context_cache, context_mask)
        np.testing.assert_allclose(y[:, 0], expected[:, i], rtol=1e-5,
                                   atol=1e-5)


# Execution modes and precision -----------------------------------------------

def test_eager_function_and_xla_decode_alike(weights, source):
    model = _t5(weights, k=K)
    eager = model.generate(source[:2], LENGTH, eos_id=3)
    for jit in (False, True):
        traced = tf.function(
            lambda tokens: model.generate(tokens, LENGTH, eos_id=3),
            jit_compile=jit)
        np.testing.assert_array_equal(traced(source[:2]), eager)
    # An unknown batch size: the masked path, the same tokens.
    unknown = tf.function(
        lambda tokens: model.generate(tokens, LENGTH, eos_id=3),
        input_signature=[tf.TensorSpec([None, None], tf.int32)])
    np.testing.assert_array_equal(unknown(source[:2]), eager)


def test_mixed_bfloat16_decodes(weights, source):
    model = _t5(weights, k=K, dtype="mixed_bfloat16")
    assert model.decoder_blocks[0].compute_dtype == "bfloat16"
    sampling = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 1}
    for generate, kwargs in (
            (model.generate, {}), (model.generate, sampling),
            (tf.function(model.generate, jit_compile=True), sampling)):
        tokens = generate(source[:2], LENGTH, **kwargs).numpy()
        assert tokens.shape == (2, LENGTH) and tokens.dtype == np.int32
        assert ((tokens >= 0) & (tokens < VOCAB)).all()


# End of sequence -------------------------------------------------------------

def test_eos_stops_rows_pads_them_and_ends_the_loop(weights, source,
                                                    monkeypatch):
    model = _t5(weights, k=K)
    free = model.generate(source, LENGTH).numpy()
    eos = int(free[0, 5])  # a token that row 0 emits late
    stopped = model.generate(source, LENGTH, eos_id=eos).numpy()
    for row, tokens in zip(free, stopped):
        ends = np.flatnonzero(row == eos)
        end = ends[0] + 1 if len(ends) else LENGTH
        np.testing.assert_array_equal(tokens[:end], row[:end])
        assert (tokens[end:] == 0).all()
    # Once every row has emitted it, no more steps run (eagerly, the loop
    # calls the step function once per token).
    steps = _count_calls(monkeypatch, model, "_decode_step")
    row = free[:1]
    first = int(np.flatnonzero(row[0] == row[0, 2])[0])
    tokens = model.generate(source[:1], LENGTH, eos_id=int(row[0, 2]))
    assert len(steps) == first + 1 < LENGTH
    assert (tokens.numpy()[0, first + 1:] == 0).all()


# Sampling --------------------------------------------------------------------

def test_sampling_is_seeded(weights, source):
    model = _t5(weights, k=K)
    first = model.generate(source, LENGTH, temperature=1.0, seed=7)
    np.testing.assert_array_equal(
        model.generate(source, LENGTH, temperature=1.0, seed=7), first)
    np.testing.assert_array_equal(
        tf.function(lambda s: model.generate(s, LENGTH, temperature=1.0,
                                             seed=[7, 0]))(source), first)
    assert (model.generate(source, LENGTH, temperature=1.0, seed=8).numpy()
            != first.numpy()).any()
    assert (first.numpy() != model.generate(source, LENGTH).numpy()).any()


@pytest.mark.parametrize("kwargs", [
    {"temperature": 1e-4}, {"temperature": 1.0, "top_k": 1},
    {"temperature": 2.0, "top_p": 1e-6}])
def test_sampling_limits_are_greedy(weights, source, kwargs):
    model = _t5(weights, k=K)
    np.testing.assert_array_equal(
        model.generate(source, LENGTH, seed=3, **kwargs),
        model.generate(source, LENGTH))


def test_sampled_tokens_respect_top_k_and_top_p(weights, source):
    model = _t5(weights, k=K)
    for kwargs in ({"top_k": 3}, {"top_p": 0.5}):
        tokens = model.generate(source, LENGTH, temperature=1.5, seed=5,
                                **kwargs).numpy()
        logits = model({"encoder_tokens": source, "decoder_tokens": np.pad(
            tokens[:, :-1], [[0, 0], [1, 0]])}).numpy() / 1.5
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
])
def test_bad_arguments_raise(weights, kwargs, match):
    model = _t5(weights)
    kwargs = {"encoder_tokens": np.ones((1, 3), "int32"), "max_length": 2,
              **kwargs}
    with pytest.raises(ValueError, match=match) as error:
        model.generate(**kwargs)
    assert "\n" not in str(error.value)


# The benchmark ---------------------------------------------------------------

@pytest.mark.slow
def test_decode_benchmark_on_tiny_shapes(tmp_path):
    out = tmp_path / "decode.json"
    subprocess.run(
        [sys.executable, "benchmarks/decode.py", "--variants", "tiny",
         "--vocab_size=64", "--k=8", "--rank=8", "--candidates=16",
         "--source_length=6", "--max_length=3", "--batches", "1",
         "--modes", "tf.function", "--repeats=1",
         "--calibration_batches=2", f"--json={out}"],
        cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    cases = ("dense", "top-8 masked", "top-8 default", "top-8 two-stage")
    assert [(r["batch"], r["case"]) for r in result["rows"]] == [
        (1, case) for case in cases]
    [probe] = result["probes"]
    assert probe["variant"] == "tiny" and probe["weights_mb"] > 0
    assert 0 < probe["two_stage_recall"] <= 1
    for row in result["rows"]:
        assert row["variant"] == "tiny" and row["mode"] == "tf.function"
        assert row["tokens_per_s"] > 0 and row["encode_ms"] > 0
        assert row["probe_ms"] > 0 and np.isfinite(row["step_over_probe"])
        if row["case"] == "dense":
            assert row["throughput_ratio"] == 1.0
