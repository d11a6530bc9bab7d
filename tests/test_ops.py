"""Behaviour of the pure-TensorFlow Top-k functions in topk_sparse.ops."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

from topk_sparse import ops


def reference_topk_mask(x, k):
    """numpy: relu, keep the k largest per row; ties to the lower index."""
    a = np.maximum(x, 0)
    flat = a.reshape(-1, a.shape[-1])
    keep = np.zeros_like(flat, dtype=bool)
    order = np.argsort(-flat, axis=-1, kind="stable")[:, :k]
    np.put_along_axis(keep, order, True, axis=-1)
    return np.where(keep, flat, 0).reshape(a.shape)


def test_exact_matches_reference_with_ties_and_few_positives():
    x = np.array([
        [1.0, 2.0, 2.0, 2.0, 0.5, -1.0],   # tie at the k-th value
        [-1.0, 3.0, -2.0, -3.0, -4.0, -5.0],  # fewer than k positive
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
    ], "float32")
    out = ops.topk_mask(x, k=2, method="exact").numpy()
    np.testing.assert_array_equal(out, reference_topk_mask(x, 2))
    # The tie rule is tf.math.top_k's: the lower index wins.
    np.testing.assert_array_equal(out[0], [0, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(out[1], [0, 3, 0, 0, 0, 0])


@pytest.mark.parametrize("method", ["exact", "approx", "auto"])
def test_keeps_at_most_k_largest_with_unknown_dims_and_gradient(method):
    k = 5
    x = tf.random.stateless_normal([3, 7, 64], seed=[1, 2])

    @tf.function(input_signature=[tf.TensorSpec([None, None, 64])])
    def masked_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.topk_mask(x, k, method=method)
            loss = tf.reduce_sum(y * tf.range(64, dtype=y.dtype))
        return y, tape.gradient(loss, x)

    y, grad = masked_and_grad(x)
    np.testing.assert_array_equal(y.numpy(), reference_topk_mask(x.numpy(), k))
    kept = y.numpy() != 0
    np.testing.assert_array_equal(grad.numpy() != 0, kept & (np.arange(64) > 0))


def test_gradient_matches_numeric():
    x = tf.random.stateless_normal([4, 16], seed=[3, 4], dtype=tf.float64)
    theoretical, numeric = tf.test.compute_gradient(
        lambda x: ops.topk_mask(x, 3, method="exact"), [x], delta=1e-6)
    np.testing.assert_allclose(theoretical[0], numeric[0], atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_jit_compile_matches_eager(method):
    x = tf.random.stateless_normal([8, 3072], seed=[5, 6])
    eager = ops.topk_mask(x, 64, method=method)
    compiled = tf.function(
        lambda x: ops.topk_mask(x, 64, method=method), jit_compile=True)(x)
    np.testing.assert_array_equal(eager.numpy(), compiled.numpy())


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 300),
    k_fraction=st.floats(0.0, 1.0),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    method=st.sampled_from(["exact", "approx"]),
    seed=st.integers(0, 2**16),
)
def test_properties(rows, n, k_fraction, dtype, method, seed):
    k = max(1, int(round(k_fraction * n)))
    x = tf.cast(tf.random.stateless_normal([rows, n], seed=[seed, 0]), dtype)
    y = ops.topk_mask(x, k, method=method)
    assert y.dtype == x.dtype and y.shape == x.shape
    x32, y32 = (tf.cast(t, tf.float32).numpy() for t in (x, y))
    kept = y32 != 0
    assert (kept.sum(-1) <= k).all()
    np.testing.assert_array_equal(y32[kept], x32[kept])
    assert (x32[kept] > 0).all()
    if method == "exact":
        # Every dropped positive is no larger than every kept value.
        for row_x, row_kept in zip(x32, kept):
            dropped = row_x[~row_kept & (row_x > 0)]
            if dropped.size and row_kept.any():
                assert dropped.max() <= row_x[row_kept].min()
            assert row_kept.sum() == min(k, (row_x > 0).sum())


def reference_binned(x, k, bins):
    """numpy: max of each strided bin (i mod bins), keep the top-k bins."""
    n = x.shape[-1]
    padded = np.full((x.shape[0], -(-n // bins) * bins), -np.inf, x.dtype)
    padded[:, :n] = x
    grid = padded.reshape(x.shape[0], -1, bins)
    top_bins = np.argsort(-grid.max(1), axis=-1, kind="stable")[:, :k]
    group = np.take_along_axis(grid.argmax(1), top_bins, axis=-1)
    return np.sort(group * bins + top_bins, axis=-1)


@pytest.mark.parametrize("n,k,recall_target", [
    (3072, 64, 0.95), (3072, 16, 0.9), (1000, 8, 0.8), (2048, 1, 0.95)])
def test_binned_approx_selects_top_of_top_bins(n, k, recall_target):
    x = tf.random.stateless_normal([6, n], seed=[7, n])
    _, indices = ops.topk_indices(x, k, "approx", recall_target)
    bins = ops.approx_bin_count(n, k, recall_target)
    np.testing.assert_array_equal(
        np.sort(indices.numpy(), -1), reference_binned(x.numpy(), k, bins))


@pytest.mark.parametrize("n,k,recall_target", [
    (3072, 64, 0.95), (3072, 32, 0.9), (2048, 16, 0.8), (4096, 128, 0.95)])
def test_binned_recall_meets_target_and_formula(n, k, recall_target):
    x = tf.random.stateless_normal([512, n], seed=[8, k])
    _, approx = ops.topk_indices(x, k, "approx", recall_target)
    _, exact = tf.math.top_k(x, k)
    hits = tf.reduce_sum(tf.cast(
        approx[:, :, None] == exact[:, None, :], tf.float32), [1, 2])
    recall = float(tf.reduce_mean(hits)) / k
    assert recall >= recall_target
    # iid rows put the top-k in effectively random strided bins.
    assert abs(recall - ops.expected_recall(n, k, recall_target)) < 0.01


def test_bin_count_formula():
    # Values of XLA's ApproxTopKReductionOutputSize (approx_topk_shape.cc).
    assert ops.approx_bin_count(3072, 64, 0.95) == 1536
    assert ops.approx_bin_count(3072, 32, 0.95) == 768
    assert ops.approx_bin_count(3072, 128, 0.95) == 3072  # no reduction
    assert ops.approx_bin_count(4096, 1, 0.95) == 128  # k = 1: one tile
    assert ops.approx_bin_count(100, 5, 0.5) == 100  # within one tile
    assert ops.approx_bin_count(3072, 64, 1.0) == 3072
    assert ops.approx_bin_count(5000, 1, 0.9, rank=1) == 1024
    assert ops.approx_bin_count(65536, 10, 0.5) == 128  # m clamps to T


def test_auto_and_approx_use_approx_max_k_on_tpu(monkeypatch):
    calls = []
    real = tf.math.approx_max_k
    monkeypatch.setattr(ops, "on_tpu", lambda: True)
    monkeypatch.setattr(tf.math, "approx_max_k",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    x = tf.random.stateless_normal([4, 256], seed=[9, 9])
    y = ops.topk_mask(x, 8, method="auto", recall_target=0.9)
    assert calls == [{"recall_target": 0.9}]
    # approx_max_k is exact off TPU.
    np.testing.assert_array_equal(y.numpy(), reference_topk_mask(x.numpy(), 8))
    with pytest.raises(TypeError, match="float64"):
        ops.topk_mask(tf.cast(x, tf.float64), 8, method="approx")
    monkeypatch.setattr(ops, "on_tpu", lambda: False)
    assert ops.resolve_method("auto") == "exact"


@pytest.mark.parametrize("k,match", [
    (0, "positive int"), (-3, "positive int"), (2.0, "positive int"),
    (True, "positive int"), (9, "larger than")])
def test_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        ops.topk_mask(tf.ones([2, 8]), k)


def test_bad_inputs():
    with pytest.raises(ValueError, match="Unknown method"):
        ops.topk_mask(tf.ones([2, 8]), 2, method="fast")
    with pytest.raises(ValueError, match="recall_target"):
        ops.topk_mask(tf.ones([2, 8]), 2, recall_target=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        ops.topk_mask(tf.ones([2, 8], tf.int32), 2)
    with pytest.raises(ValueError, match="rank >= 1"):
        ops.topk_mask(tf.constant(1.0), 1)
    with pytest.raises(ValueError, match="last axis"):
        tf.function(lambda x: ops.topk_mask(x, 2)).get_concrete_function(
            tf.TensorSpec([2, None]))


def reference_statistical(x, k):
    """numpy: keep the positive entries above mean + std * Φ⁻¹(1 - k/n)."""
    from scipy.stats import norm
    x64 = x.astype(np.float64)
    cutoff = x64.mean(-1, keepdims=True) + norm.ppf(1 - k / x.shape[-1]) \
        * x64.std(-1, keepdims=True)
    return np.where(x64 > np.maximum(cutoff, 0), x, 0).astype(x.dtype)


def test_statistical_keeps_what_exceeds_the_gaussian_cutoff():
    x = tf.random.stateless_normal([512, 3072], seed=[10, 1]) + 0.3
    y = ops.topk_mask(x, 64, method="statistical").numpy()
    expected = reference_statistical(x.numpy(), 64)
    # float32 moments vs float64: entries within rounding of the cutoff may
    # flip; a handful at most.
    assert (y != expected).sum() <= 5
    counts = (y > 0).sum(-1)
    assert abs(counts.mean() - 64) < 2  # about k per row on Gaussian rows
    assert counts.std() < 12
    # A row with too few positives keeps only those; k == n is ReLU.
    small = tf.constant([[-1.0, -2.0, 3.0, -4.0]])
    np.testing.assert_array_equal(
        ops.topk_mask(small, 2, method="statistical"), [[0, 0, 3, 0]])
    np.testing.assert_array_equal(
        ops.topk_mask(small, 4, method="statistical"), tf.nn.relu(small))


def test_statistical_unknown_dims_gradient_jit_and_bfloat16():
    x = tf.random.stateless_normal([3, 7, 256], seed=[11, 2])

    @tf.function(input_signature=[tf.TensorSpec([None, None, 256])])
    def masked_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.topk_mask(x, 16, method="statistical")
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, x)

    y, grad = masked_and_grad(x)
    np.testing.assert_array_equal(grad.numpy(), (y.numpy() != 0))
    compiled = tf.function(lambda x: ops.topk_mask(x, 16, "statistical"),
                           jit_compile=True)(x)
    assert (compiled.numpy() != y.numpy()).sum() <= 2
    y16 = ops.topk_mask(tf.cast(x, tf.bfloat16), 16, "statistical")
    assert y16.dtype == tf.bfloat16
    assert abs(float(tf.reduce_mean(tf.cast(y16 > 0, tf.float32))) * 256
               - float(tf.reduce_mean(tf.cast(y > 0, tf.float32))) * 256) < 1


@pytest.mark.parametrize("method", ["exact", "approx", "statistical"])
def test_topk_activations_feed_the_sparse_product(method):
    x = tf.random.stateless_normal([4, 5, 96], seed=[1, 1])
    kernel = tf.random.stateless_normal([96, 12], seed=[2, 2])
    values, indices = ops.topk_activations(x, 10, method)
    assert values.shape == indices.shape == (4, 5, 10)
    kept = ops.topk_mask(x, 10, method).numpy()
    if method == "statistical":  # some rows pass more than k: cover both
        counts = (kept > 0).sum(-1)
        assert counts.max() > 10 and counts.min() <= 10
    # The gathered product sums the k largest of the kept activations.
    expected = reference_topk_mask(kept, 10) @ kernel.numpy()
    np.testing.assert_allclose(
        ops.sparse_mlp_product(values, indices, kernel).numpy(),
        expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="statistical"):
        ops.topk_indices(x, 10, "statistical")
