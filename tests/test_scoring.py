"""Two-stage scoring: low-rank first stage, exact rescoring, in SparseMLP."""

import keras
import numpy as np
import pytest

from tests import backend
from tests.backend import BACKEND, numpy
from topk_sparse import scoring
from topk_sparse.sparsity import metric_state
from topk_sparse.layers import SparseMLP
from topk_sparse.models import T5, ViT


def low_dim_inputs(tokens, d, dim, seed):
    """`[tokens, d]` inputs that span only `dim` directions, like the
    anisotropic inputs of trained Transformer MLPs (in the extreme)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(tokens, dim))
            @ rng.normal(size=(dim, d))).astype("float32")


def mlp(hidden=256, k=8, d=32, **kwargs):
    layer = SparseMLP(hidden, k=k, implementation="gather",
                      bias_initializer="random_normal", **kwargs)
    layer.build((None, d))
    return layer


def test_factors_are_exact_on_inputs_of_that_rank():
    kernel = np.random.default_rng(0).normal(size=(32, 256))
    x = low_dim_inputs(500, 32, 6, seed=1)
    factor, basis = scoring.low_rank_factors(kernel, x, rank=6)
    assert factor.shape == (32, 6) and basis.shape == (6, 256)
    np.testing.assert_allclose(x @ factor @ basis, x @ kernel, rtol=1e-3,
                               atol=1e-3)
    # The fit is to the inputs: full-rank inputs are approximated, not met.
    full = np.random.default_rng(2).normal(size=(500, 32))
    error = np.linalg.norm(full @ factor @ basis - full @ kernel)
    assert error > 0.3 * np.linalg.norm(full @ kernel)


@pytest.mark.parametrize("rank, tokens, match", [
    (0, 100, "rank"), (33, 100, "rank"), (6.0, 100, "rank"),
    (16, 10, "calibration tokens")])
def test_factors_reject_bad_rank_and_too_few_tokens(rank, tokens, match):
    with pytest.raises(ValueError, match=match):
        scoring.low_rank_factors(np.ones((32, 256)),
                                 np.ones((tokens, 32)), rank)


def test_all_candidates_rescored_is_the_exact_top_k():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 32)).astype("float32")
    kernel = rng.normal(size=(32, 64)).astype("float32")
    bias = rng.normal(size=(64,)).astype("float32")
    factor, basis = scoring.low_rank_factors(kernel, x, rank=2)  # poor
    values, indices = scoring.two_stage_topk(
        x, 5, 64, factor, basis, kernel.T.copy(), bias)
    scores = np.maximum(x @ kernel + bias, 0)
    expected = np.argsort(-scores, axis=-1, kind="stable")[:, :5]
    np.testing.assert_allclose(numpy(values), np.take_along_axis(
        scores, expected, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(numpy(indices), expected)


def test_calibrated_layer_matches_the_exact_gathered_path():
    layer = mlp()
    x = low_dim_inputs(2000, 32, 8, seed=4)
    exact = numpy(layer(x[:1]))
    scoring.calibrate_mlp(layer, x, rank=8, candidates=32)
    quality = scoring.measure_two_stage(layer, x[1000:])
    assert quality["recall"] == 1.0 and quality["cosine"] > 0.9999
    assert layer.scorer.kernel_rows.shape == (256, 32)
    np.testing.assert_allclose(numpy(layer(x[:1])), exact, rtol=1e-4,
                               atol=1e-4)
    compiled = backend.compiled_call(layer, "jit")
    np.testing.assert_allclose(numpy(compiled(x[:1])), exact, rtol=1e-4,
                               atol=1e-4)
    # The scorer is inference state: no Keras weight, not saved.
    assert len(layer.trainable_weights) == 4
    assert not layer.non_trainable_weights
    assert {id(v) for v in layer.non_trainable_variables} == {
        id(v) for v in metric_state(layer)}


def test_poor_scorer_shows_in_the_measure_and_not_past_the_switch():
    layer = mlp()
    x = np.random.default_rng(5).normal(size=(2000, 32)).astype("float32")
    exact_many = numpy(layer(x[:64]))
    scoring.calibrate_mlp(layer, x, rank=2, candidates=16)
    quality = scoring.measure_two_stage(layer, x)
    assert quality["recall"] < 0.8 and quality["cosine"] < 0.95
    # 64 tokens x 16 candidates > GATHER_MAX_SHARE x 256: exact scoring.
    np.testing.assert_allclose(numpy(layer(x[:64])), exact_many, rtol=1e-5,
                               atol=1e-5)


def test_measure_matches_a_numpy_count():
    layer = mlp(hidden=128, k=6, d=16)
    x = np.random.default_rng(6).normal(size=(300, 16)).astype("float32")
    scoring.calibrate_mlp(layer, x, rank=4, candidates=12)
    quality = scoring.measure_two_stage(layer, x, chunk=64)
    w1 = layer.intermediate_kernel.numpy()
    b1 = layer.intermediate_bias.numpy()
    hidden = np.maximum(x @ w1 + b1, 0)
    scorer = layer.scorer
    approx = x @ scorer.factor.numpy() @ scorer.basis.numpy() + b1
    hits = positives = 0
    for row, scores in zip(hidden, approx):
        top = np.argsort(-row, kind="stable")[:6]
        true = set(top[row[top] > 0])
        candidates = np.argsort(-scores, kind="stable")[:12]
        chosen = set(candidates[np.argsort(-row[candidates],
                                           kind="stable")[:6]])
        hits += len(true & chosen)
        positives += len(true)
    assert quality["recall"] == pytest.approx(hits / positives, abs=0.01)


def test_training_with_a_scorer_is_refused_until_removed():
    layer = mlp()
    x = low_dim_inputs(100, 32, 8, seed=7)
    scoring.calibrate_mlp(layer, x, rank=8)
    assert layer.scorer.candidates == 32  # 4 k
    with pytest.raises(ValueError, match="mlp.scorer = None"):
        layer(x[:1], training=True)
    layer.scorer = None
    assert layer.scorer is None
    layer(x[:1], training=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"candidates": 4}, "candidates"), ({"candidates": 257}, "candidates"),
    ({"candidates": 16.0}, "candidates"), ({"rank": 33}, r"rank .*\[1, 32\]"),
    ({"rank": 0}, "rank")])
def test_calibration_rejects_bad_rank_and_candidates(kwargs, match):
    layer = mlp()  # d=32, hidden 256, k=8
    with pytest.raises(ValueError, match=match):
        scoring.check(layer, **{"rank": 8, **kwargs})
    with pytest.raises(ValueError, match=match):
        scoring.calibrate_mlp(layer, low_dim_inputs(100, 32, 8, 8),
                                **{"rank": 8, **kwargs})


def test_calibration_needs_k_and_a_built_layer():
    dense = SparseMLP(64)
    dense.build((None, 8))
    unbuilt = SparseMLP(64, k=4)
    for layer in (dense, unbuilt):
        with pytest.raises(ValueError, match="built layer with k"):
            scoring.calibrate_mlp(layer, np.ones((100, 8), "float32"), rank=4)


def test_bfloat16_scorer():
    layer = mlp(dtype="mixed_bfloat16")
    x = low_dim_inputs(1000, 32, 8, seed=9)
    scoring.calibrate_mlp(layer, x, rank=8, candidates=32)
    quality = scoring.measure_two_stage(layer, x)
    assert layer.scorer.factor.dtype == "bfloat16"
    assert quality["recall"] > 0.95
    assert keras.backend.standardize_dtype(layer(x[:1]).dtype) == "bfloat16"


def test_model_calibration_records_every_mlp_eagerly():
    keras.utils.set_random_seed(0)
    model = ViT("micro", image_size=16, num_classes=10, k=8)
    images = np.random.default_rng(10).normal(
        size=(3, 8, 16, 16, 3)).astype("float32")
    model(images[0])  # the sparsity metrics count these 8 images
    counted = [v.numpy() for v in metric_state(model)]
    quality = scoring.calibrate(model, images[:2], rank=16, candidates=16,
                                held_out=images[2:])
    assert set(quality) == {"encoder_block_0_mlp", "encoder_block_1_mlp"}
    # Calibration's own calls are not counted.
    for variable, value in zip(metric_state(model), counted):
        np.testing.assert_array_equal(variable.numpy(), value)
    for path, mlp_ in model.sparse_mlps().items():
        assert mlp_.scorer.rank == 16
        assert 0 < quality[path]["recall"] <= 1
        # A sixth of mlp_dim 128 is 21.3 rows: one token of 16 candidates.
        assert quality[path]["max_tokens"] == scoring.max_tokens(mlp_) == 1
    with scoring.recording_inputs(model.sparse_mlps()) as records:
        model(images[0])
        assert [r.shape for r in records["encoder_block_1_mlp"]] == [
            (8 * 17, 32)]  # 16 patches and the class token
        with pytest.raises(RuntimeError, match="eager"):
            backend.compiled_with_state(model, model.variables,
                                        "function")(images[0])
    # The scorers are back in their slots.
    assert all(m.scorer.rank == 16 for m in model.sparse_mlps().values())


def test_each_mlp_scores_its_own_k():
    keras.utils.set_random_seed(0)
    model = ViT("micro", image_size=16, num_classes=10, k=[4, 8])
    images = np.random.default_rng(11).normal(
        size=(2, 8, 16, 16, 3)).astype("float32")
    quality = scoring.calibrate(model, images, rank=8)
    # Candidates default to 4 k, each MLP's own.
    assert {path: q["candidates"] for path, q in quality.items()} == {
        "encoder_block_0_mlp": 16, "encoder_block_1_mlp": 32}
    assert {path: mlp_.scorer.candidates for path, mlp_ in
            model.sparse_mlps().items()} == {"encoder_block_0_mlp": 16,
                                             "encoder_block_1_mlp": 32}
    values, indices = model.sparse_mlps()["encoder_block_1_mlp"].scorer.topk(
        np.ones((1, 32), "float32"), 8)
    assert values.shape == indices.shape == (1, 8)


def test_calibrated_two_stage_scoring_runs_in_cached_decoding(monkeypatch):
    # Each decoding step's decoder MLPs see one token per sequence: the
    # calibrated scorer picks their neurons (the loop body runs once per
    # token on TensorFlow, is traced once on JAX).
    model = T5("tiny", vocab_size=20, k=16, dropout_rate=0.0)
    source = np.random.default_rng(1).integers(1, 20, (4, 6)).astype("int32")
    batches = [{"encoder_tokens": source, "decoder_tokens": source}] * 4
    scoring.calibrate(model, batches, rank=8, candidates=16)
    scored = []
    topk = scoring.TwoStageScorer.topk
    monkeypatch.setattr(scoring.TwoStageScorer, "topk",
                        lambda *args: scored.append(1) or topk(*args))
    tokens = model.generate(source[:1], 9)
    assert len(scored) == model.depth * (9 if BACKEND == "tensorflow" else 1)
    assert tokens.shape == (1, 9)
