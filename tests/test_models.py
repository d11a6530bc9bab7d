"""ViT and T5 with Top-k sparse MLPs: shapes, training (XLA, mixed precision,
data parallel), saving, the exposed sparsity, T5's masks, relative
position buckets and greedy decoding, and argument validation; on every
backend."""

import os

import keras
import numpy as np
import pytest

from tests import backend
from tests.backend import numpy
from topk_sparse import SparseMLP, ops
from topk_sparse.models import (T5, T5_VARIANTS, VIT_VARIANTS,
                                TransformerBlock, ViT,
                                relative_position_bucket)

IMAGE_SIZE = 16
NUM_CLASSES = 4
VOCAB = 20
K = 8  # of mlp_dim 128 (ViT micro) or 256 (T5 tiny)


def _vit(**kwargs):
    kwargs = {"variant": "micro", "image_size": IMAGE_SIZE,
              "num_classes": NUM_CLASSES, "k": K, **kwargs}
    return ViT(**kwargs)


def _t5(**kwargs):
    return T5(**{"variant": "tiny", "vocab_size": VOCAB, "k": 16,
                 "dropout_rate": 0.0, **kwargs})


def _compile(model, jit_compile=False, learning_rate=3e-3):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile)
    return model


def _images(n=32, seed=0):
    """A learnable toy problem: class c brightens channel c % 3 of one
    image quadrant, under unit noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=n)
    images = rng.normal(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    half = IMAGE_SIZE // 2
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 2)
        images[i, row * half:(row + 1) * half, col * half:(col + 1) * half,
               c % 3] += 2.0
    return images, labels


def _copy_task(n=64, length=6, seed=0):
    """Targets copy the source; the decoder reads them shifted right."""
    tokens = np.random.default_rng(seed).integers(
        1, VOCAB, size=(n, length)).astype("int32")
    return _t5_inputs(tokens, tokens), tokens


def _t5_inputs(encoder_tokens, targets):
    decoder_tokens = np.pad(targets[:, :-1], [[0, 0], [1, 0]])
    return {"encoder_tokens": encoder_tokens,
            "decoder_tokens": decoder_tokens.astype("int32")}


def _check_sparsity_logs(model, history, k, mlp_dim):
    """One nonzero_fraction key per MLP in History, within k / mlp_dim."""
    keys = sorted(key for key in history.history if "nonzero_fraction" in key)
    expected = sorted(f"{mlp.name}/nonzero_fraction"
                      for mlp in model.sparse_mlps().values())
    assert keys == expected
    for key in keys:
        fraction = history.history[key][-1]
        assert 0 < fraction <= (k or mlp_dim) / mlp_dim


# ViT ------------------------------------------------------------------------

@pytest.mark.parametrize("pooling,k", [("cls", K), ("gap", None)])
def test_vit_forward_shapes(pooling, k):
    model = _vit(pooling=pooling, k=k)
    images, _ = _images(3)
    assert model(images).shape == (3, NUM_CLASSES)
    fraction = float(model.sparse_mlps()["encoder_block_0_mlp"]
                     .nonzero_fraction.result())
    if k is None:  # the dense ReLU baseline: about half active at init
        assert 0.2 < fraction < 0.8
    else:
        assert 0 < fraction <= k / 128
    assert tuple(model.output_shape) == (None, NUM_CLASSES)
    num_patches = (IMAGE_SIZE // 4) ** 2
    tokens = num_patches + (pooling == "cls")
    embedding = model.get_layer("position_embedding").embedding
    assert embedding.shape == (tokens, 32)
    names = [layer.name for layer in model.layers]
    assert ("class_token" in names) == (pooling == "cls")


def test_vit_sparse_mlps_are_named_by_path():
    mlps = _vit(variant="tiny").sparse_mlps()
    assert list(mlps) == [f"encoder_block_{i}_mlp" for i in range(4)]
    for path, mlp in mlps.items():
        assert isinstance(mlp, SparseMLP)
        assert mlp.name == path.replace("/", "_")
        assert (mlp.k, mlp.mlp_dim) == (K, 256)


def test_vit_fit_decreases_loss_and_logs_sparsity():
    model = _compile(_vit())
    images, labels = _images(64)
    history = model.fit(images, labels, batch_size=16, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    _check_sparsity_logs(model, history, K, 128)


def test_vit_fit_jit_compile():
    model = _compile(_vit(pooling="gap", dropout_rate=0.1), True)
    images, labels = _images(8)
    # Full batches: one XLA compilation (a partial batch would add another).
    history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    _check_sparsity_logs(model, history, K, 128)


def test_vit_mixed_bfloat16_fit():
    model = _compile(_vit(dtype="mixed_bfloat16"))
    block = model.get_layer("encoder_block_0")
    assert block.compute_dtype == "bfloat16"
    assert block.mlp.compute_dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in model.weights)
    images, labels = _images(8)
    history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    _check_sparsity_logs(model, history, K, 128)


def test_vit_data_parallel_fit():
    with backend.data_parallel():
        model = _compile(_vit())
    images, labels = _images(8)
    history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    _check_sparsity_logs(model, history, K, 128)
    mlp = model.sparse_mlps()["encoder_block_0_mlp"]
    # Both devices' tokens are counted: 8 images x 17 tokens.
    assert float(mlp.nonzero_fraction.token_count.numpy()) == 8 * 17


def _check_round_trip(model, inputs, tmp_path):
    """Saves `model` as .keras, loads it back and checks class, config and
    predictions; returns the loaded model."""
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0),
                               model.predict(inputs, verbose=0), rtol=1e-6)
    return loaded


@pytest.mark.parametrize("pooling", ["cls", "gap"])
def test_vit_keras_round_trip(pooling, tmp_path):
    model = _vit(pooling=pooling, implementation="gather")
    images, _ = _images(4)
    loaded = _check_round_trip(model, images, tmp_path)
    assert list(loaded.sparse_mlps()) == list(model.sparse_mlps())


def test_vit_variants_match_the_paper():
    # arXiv 2010.11929 Table 1 (Base, Large); 2106.10270 (Ti, S).
    assert VIT_VARIANTS["B/16"] == dict(width=768, depth=12, num_heads=12,
                                        mlp_dim=3072, patch_size=16)
    assert VIT_VARIANTS["L/16"] == dict(width=1024, depth=24, num_heads=16,
                                        mlp_dim=4096, patch_size=16)
    assert VIT_VARIANTS["Ti/16"]["width"] == 192
    assert VIT_VARIANTS["S/16"]["width"] == 384
    # Explicit dimensions override the variant's.
    model = ViT("micro", image_size=8, num_classes=2, depth=1, patch_size=2)
    assert (model.depth, model.patch_size, model.width) == (1, 2, 32)
    assert len(model.sparse_mlps()) == 1


# T5 -------------------------------------------------------------------------

def test_t5_fit_copy_task():
    model = _compile(_t5())
    inputs, targets = _copy_task()
    assert model(inputs).shape == (64, 6, VOCAB)
    history = model.fit(inputs, targets, batch_size=16, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    assert list(model.sparse_mlps()) == [
        "encoder_block_0_mlp", "encoder_block_1_mlp",
        "decoder_block_0_mlp", "decoder_block_1_mlp"]
    _check_sparsity_logs(model, history, 16, 256)


def test_t5_decoder_is_causal():
    model = _t5()
    inputs, _ = _copy_task(n=2, length=7)
    changed = {**inputs, "decoder_tokens": inputs["decoder_tokens"].copy()}
    changed["decoder_tokens"][:, 4] = (changed["decoder_tokens"][:, 4]
                                       % (VOCAB - 1)) + 1
    before, after = numpy(model(inputs)), numpy(model(changed))
    np.testing.assert_allclose(after[:, :4], before[:, :4], atol=1e-5)
    assert np.abs(after[:, 4:] - before[:, 4:]).max() > 1e-3


def test_t5_encoder_padding_is_masked():
    model = _t5()
    inputs, _ = _copy_task(n=3, length=5)
    padded = {**inputs, "encoder_tokens": np.pad(inputs["encoder_tokens"],
                                                 [[0, 0], [0, 4]])}
    np.testing.assert_allclose(numpy(model(padded)), numpy(model(inputs)),
                               atol=1e-5)
    # What fills the padding does matter once it is not id 0.
    unmasked = {**inputs, "encoder_tokens": np.pad(
        inputs["encoder_tokens"], [[0, 0], [0, 4]], constant_values=3)}
    assert np.abs(numpy(model(unmasked)) - numpy(model(inputs))).max() \
        > 1e-3


def test_relative_position_bucket_matches_t5_table():
    # By hand from T5's formula (num_buckets=32, max_distance=128):
    # bidirectional: 16 buckets per direction, distances < 8 exact, then
    # 8 + floor(log(d / 8) / log(128 / 8) * 8), at most 15; keys after the
    # query add 16. E.g. d=12: 8 + floor(0.1462 * 8) = 9.
    relative = [0, -1, -7, -8, -12, -40, -127, -128, -1000,
                1, 3, 7, 8, 20, 100, 1000]
    expected = [0, 1, 7, 8, 9, 12, 15, 15, 15,
                17, 19, 23, 24, 26, 31, 31]
    np.testing.assert_array_equal(
        numpy(relative_position_bucket(np.array(relative))), expected)
    # causal: 32 buckets, future keys in bucket 0, distances < 16 exact,
    # then 16 + floor(log(d / 16) / log(128 / 16) * 16), at most 31.
    relative = [5, 1, 0, -1, -15, -16, -20, -50, -100, -127, -128, -200]
    expected = [0, 0, 0, 1, 15, 16, 17, 24, 30, 31, 31, 31]
    np.testing.assert_array_equal(
        numpy(relative_position_bucket(np.array(relative),
                                       bidirectional=False)), expected)


def test_t5_generate_static_shapes_and_xla():
    model = _t5()
    encoder_tokens = _copy_task(n=3, length=5)[0]["encoder_tokens"]
    eager = model.generate(encoder_tokens, max_length=4)
    assert eager.shape == (3, 4)
    assert keras.backend.standardize_dtype(eager.dtype) == "int32"
    # Under XLA (on JAX: jax.jit over the model's variables, as keras-hub
    # compiles its generate).
    compiled = backend.compiled_with_state(
        lambda tokens: model.generate(tokens, 4), model.variables, "jit")
    np.testing.assert_array_equal(numpy(compiled(encoder_tokens)), eager)
    # Greedy: each token is the argmax of the teacher-forced logits given
    # the tokens before it.
    logits = numpy(model(_t5_inputs(encoder_tokens, numpy(eager))))
    np.testing.assert_array_equal(logits.argmax(-1), eager)


def test_t5_masked_and_gather_give_the_same_logits():
    masked = _t5(implementation="masked")
    gather = _t5(implementation="gather")
    gather.set_weights(masked.get_weights())
    inputs, _ = _copy_task(n=2, length=5)
    np.testing.assert_allclose(numpy(gather(inputs)), numpy(masked(inputs)),
                               rtol=1e-4, atol=1e-4)


def test_t5_keras_round_trip_and_bfloat16(tmp_path):
    model = _t5(dropout_rate=0.1)
    inputs, _ = _copy_task(n=2, length=5)
    _check_round_trip(model, inputs, tmp_path)
    # Mixed precision computes in bfloat16 and keeps float32 weights.
    mixed = _t5(dtype="mixed_bfloat16")
    mixed.set_weights(model.get_weights())
    assert all(w.dtype == "float32" for w in mixed.weights)
    logits = mixed(inputs)
    assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
    assert np.isfinite(numpy(keras.ops.cast(logits, "float32"))).all()


def test_t5_variants_match_the_paper():
    # arXiv 1910.10683: d_model, d_ff, heads and layers per stack.
    assert T5_VARIANTS["small"] == dict(width=512, depth=6, num_heads=8,
                                        mlp_dim=2048)
    assert T5_VARIANTS["base"] == dict(width=768, depth=12, num_heads=12,
                                       mlp_dim=3072)
    assert T5_VARIANTS["large"] == dict(width=1024, depth=24, num_heads=16,
                                        mlp_dim=4096)


# One k per MLP ---------------------------------------------------------------

@pytest.mark.parametrize("k", [
    [4, None], (4, None),
    {"encoder_block_1_mlp": None, "encoder_block_0_mlp": 4}])
def test_vit_takes_one_k_per_mlp(k, tmp_path):
    model = _vit(k=k)
    assert [m.k for m in model.sparse_mlps().values()] == [4, None]
    images, _ = _images(4)
    model(images)
    fractions = [float(m.nonzero_fraction.result())
                 for m in model.sparse_mlps().values()]
    assert 0 < fractions[0] <= 4 / 128 < 0.25 < fractions[1]
    loaded = _check_round_trip(model, images, tmp_path)
    assert [m.k for m in loaded.sparse_mlps().values()] == [4, None]


def test_t5_takes_one_k_per_mlp_encoder_then_decoder(tmp_path):
    ks = [8, 16, 32, None]
    model = _t5(k=ks)
    assert {name: mlp.k for name, mlp in model.sparse_mlps().items()} == {
        "encoder_block_0_mlp": 8, "encoder_block_1_mlp": 16,
        "decoder_block_0_mlp": 32, "decoder_block_1_mlp": None}
    same = _t5(k=dict(zip(model.sparse_mlps(), ks)))
    assert same.get_config()["k"] != model.get_config()["k"]
    assert [m.k for m in same.sparse_mlps().values()] == ks
    inputs, _ = _copy_task(n=2, length=5)
    loaded = _check_round_trip(model, inputs, tmp_path)
    assert [m.k for m in loaded.sparse_mlps().values()] == ks


@pytest.mark.parametrize("k, match", [
    ([4], r"k has 1 values for 2 MLPs: give one per MLP, in layer order: "
          r"encoder_block_0_mlp, encoder_block_1_mlp\.$"),
    ({"encoder_block_0_mlp": 4, "block_1_mlp": 4},
     r"k names no MLP \['block_1_mlp'\]: .* by layer name: "
     r"encoder_block_0_mlp, encoder_block_1_mlp\.$"),
    ({"encoder_block_0_mlp": 4}, r"k misses \['encoder_block_1_mlp'\]"),
    ([4, 129], "larger than"),
])
def test_a_bad_k_per_mlp_is_one_line_naming_the_mlps(k, match):
    with pytest.raises(ValueError, match=match) as error:
        _vit(k=k)
    assert "\n" not in str(error.value)


# Arguments ------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: ViT("H/14", image_size=16), r"Unknown ViT variant 'H/14'.*B/16"),
    (lambda: ViT(image_size=16, width=32), "missing"),
    (lambda: ViT("micro", image_size=18), "not divisible by patch_size=4"),
    (lambda: ViT("micro", image_size=16, pooling="max"), "Unknown pooling"),
    (lambda: ViT("micro", image_size=16, k=129), "larger than"),
    (lambda: ViT("micro", image_size=16, num_heads=3), "divisible by"),
    (lambda: ViT("micro", image_size=16, dropout_rate=1.0), "dropout_rate"),
    (lambda: T5("xl"), r"Unknown T5 variant 'xl'.*small"),
    (lambda: T5("tiny", vocab_size=10, k=0), "positive int"),
    (lambda: T5("tiny", vocab_size=10, depth=0), "depth"),
    (lambda: TransformerBlock(2, 16, norm="batch"), "Unknown norm"),
    (lambda: _t5().generate(np.ones((1, 3), "int32"), 0), "max_length"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()



# Weights between configurations of one architecture -------------------------

_CONFIGURATIONS = [{"k": None}] + [
    {"k": K, "method": method, "implementation": implementation}
    for method in sorted(ops.METHODS)
    for implementation in ("masked", "gather")]


@pytest.mark.parametrize("make, inputs", [
    (_vit, lambda: _images(n=2)[0]),
    (_t5, lambda: _copy_task(n=2, length=5)[0])], ids=["vit", "t5"])
def test_weights_move_between_dense_and_every_topk_configuration(
        make, inputs, tmp_path):
    """A dense checkpoint loads into a Top-k model of any method and path
    (the paper's workflow) and back, by every Keras means: the sparsity
    metrics' counts are not weights."""
    x = inputs()
    models = [make(**config) for config in _CONFIGURATIONS]
    for model in models:
        model(x)
    dense = models[0]
    path = str(tmp_path / "dense.weights.h5")
    dense.save_weights(path)
    expected = [numpy(w) for w in dense.weights]
    for config, model in zip(_CONFIGURATIONS[1:], models[1:]):
        assert len(model.weights) == len(dense.weights), config
        assert all(w.dtype == "float32" for w in model.weights), config
        model.load_weights(path)
        for weight, value in zip(model.weights, expected):
            np.testing.assert_array_equal(numpy(weight), value)
        model.set_weights([value + 1.0 for value in expected])
        model.save_weights(str(tmp_path / "topk.weights.h5"))
        dense.load_weights(str(tmp_path / "topk.weights.h5"))
        dense.set_weights(model.get_weights())
        np.testing.assert_array_equal(numpy(dense.weights[0]),
                                      expected[0] + 1.0)
        dense.set_weights(expected)


def test_a_keras_file_whose_counts_were_weights_still_loads():
    """A `.keras` file written before 2026-12, when the sparsity counts
    were layer weights (an `"approx"` ViT: nonzero and recall counts),
    loads with the same outputs."""
    stored = os.path.join(os.path.dirname(__file__), "data",
                          "vit_approx_counts_as_weights")
    model = keras.saving.load_model(f"{stored}.keras")
    x = np.random.default_rng(0).normal(
        size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    np.testing.assert_allclose(numpy(model(x)), np.load(f"{stored}.npy"),
                               rtol=1e-6, atol=1e-6)
