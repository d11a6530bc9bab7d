"""Behaviour of the Top-k functions in topk_sparse.ops, on every backend."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests import backend
from tests.backend import compiled, normal, numpy
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
    out = numpy(ops.topk_mask(x, k=2, method="exact"))
    np.testing.assert_array_equal(out, reference_topk_mask(x, 2))
    # The tie rule is top_k's: the lower index wins.
    np.testing.assert_array_equal(out[0], [0, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(out[1], [0, 3, 0, 0, 0, 0])


@pytest.mark.parametrize("method", ["exact", "approx", "auto"])
def test_keeps_at_most_k_largest_with_unknown_dims_and_gradient(method):
    k = 5
    x = normal([3, 7, 64], seed=1)

    def loss_and_mask(x):
        y = ops.topk_mask(x, k, method=method)
        return keras.ops.sum(y * keras.ops.arange(64, dtype=y.dtype)), y

    (_, y), grad = backend.with_unknown_dims(
        backend.value_and_grad(loss_and_mask), [None, None, 64])(x)
    y, grad = numpy(y), numpy(grad)
    np.testing.assert_array_equal(y, reference_topk_mask(x, k))
    np.testing.assert_array_equal(grad != 0, (y != 0) & (np.arange(64) > 0))


def test_gradient_matches_numeric():
    x = normal([4, 16], seed=3)
    weights = normal([4, 16], seed=4)

    def loss(x):
        return keras.ops.sum(ops.topk_mask(x, 3, method="exact") * weights),

    _, grad = backend.value_and_grad(loss)(x)
    # Central differences: the function is linear between its kinks, which
    # are farther apart than `delta` for these inputs.
    delta, numeric = 1e-2, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = delta
        numeric[i] = (float(loss(x + step)[0]) -
                      float(loss(x - step)[0])) / (2 * delta)
    np.testing.assert_allclose(numpy(grad), numeric, atol=1e-4)
    assert (numeric != 0).sum() == 4 * 3


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_jit_compile_matches_eager(method):
    x = normal([8, 3072], seed=5)
    eager = ops.topk_mask(x, 64, method=method)
    jitted = compiled(lambda x: ops.topk_mask(x, 64, method=method), "jit")
    np.testing.assert_array_equal(numpy(eager), numpy(jitted(x)))


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
    x = keras.ops.cast(normal([rows, n], seed), dtype)
    y = ops.topk_mask(x, k, method=method)
    assert y.dtype == x.dtype and y.shape == x.shape
    x32, y32 = (numpy(keras.ops.cast(t, "float32")) for t in (x, y))
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
    x = normal([6, n], seed=n)
    _, indices = ops.topk_indices(x, k, "approx", recall_target)
    bins = ops.approx_bin_count(n, k, recall_target)
    np.testing.assert_array_equal(
        np.sort(numpy(indices), -1), reference_binned(x, k, bins))


@pytest.mark.parametrize("n,k,recall_target", [
    (3072, 64, 0.95), (3072, 32, 0.9), (2048, 16, 0.8), (4096, 128, 0.95),
    (3000, 100, 0.9)])
def test_binned_recall_meets_target_and_formula(n, k, recall_target):
    seeds, rows = 24, 128
    x = np.concatenate([normal([rows, n], seed=(8, seed))
                        for seed in range(seeds)], axis=0)
    _, approx = ops.topk_indices(x, k, "approx", recall_target)
    approx = numpy(approx)
    exact = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    hits = (approx[:, :, None] == exact[:, None, :]).sum((1, 2))
    # Per-row recall; rows are iid, so each seed's recall is a mean of
    # `rows` iid draws, whose standard error is the rows' sample standard
    # deviation over sqrt(rows). The formula must lie within 5 standard
    # errors of every seed's recall (a chance miss is p ~ 6e-7 per seed)
    # and of the recall pooled over all seeds (sqrt(24)x tighter: about
    # 0.0002-0.001 here; the independent-bin model, 0.003-0.015 too low on
    # these cases, fails it on three of them).
    per_row = hits.reshape(seeds, rows) / k
    expected = ops.expected_recall(n, k, recall_target)
    for seed_rows in per_row:
        recall = seed_rows.mean()
        assert recall >= recall_target
        standard_error = seed_rows.std(ddof=1) / np.sqrt(rows)
        assert abs(recall - expected) <= 5 * standard_error + 1e-12
    pooled_error = per_row.std(ddof=1) / np.sqrt(per_row.size)
    assert abs(per_row.mean() - expected) <= 5 * pooled_error + 1e-12


def simulated_binned_recall(n, k, bins, trials, rng):
    """numpy Monte Carlo of the binned top-k's recall: the top k at a
    uniformly random k-subset of positions, position i in bin i mod bins,
    one kept per bin that holds any. Per-trial recalls."""
    positions = np.argpartition(rng.random((trials, n)), k, axis=1)[:, :k]
    bin_of = np.sort(positions % bins, axis=1)
    occupied = 1 + (np.diff(bin_of, axis=1) != 0).sum(axis=1)
    return occupied / k


@pytest.mark.parametrize("n,k,recall_target,rank", [
    (3072, 256, 0.8, 2),   # where the independent-bin model is 0.037 low
    (3072, 64, 0.95, 2), (1000, 8, 0.8, 2),  # 1000 = 3 x 256 + 232
    (5000, 300, 0.7, 2), (8192, 32, 0.9, 1)])  # rank 1: tiles of 1024
def test_expected_recall_matches_monte_carlo(n, k, recall_target, rank):
    bins = ops.approx_bin_count(n, k, recall_target, rank)
    assert k <= bins < n  # a real reduction
    recalls = simulated_binned_recall(
        n, k, bins, 1500, np.random.default_rng(n + k))
    standard_error = recalls.std(ddof=1) / np.sqrt(recalls.size)
    expected = ops.expected_recall(n, k, recall_target, rank)
    assert abs(recalls.mean() - expected) <= 5 * standard_error
    # XLA's ((L-1)/L)^(k-1) is a lower bound.
    assert expected >= ((bins - 1) / bins) ** (k - 1)


def test_binned_is_exact_without_reduction_or_with_fewer_bins_than_k():
    assert ops.expected_recall(4096, 128, 0.95) == 1.0  # L == n
    # recall_target < 1/e: XLA's formula gives L = 768 bins for k = 1000.
    assert ops.approx_bin_count(3072, 1000, 0.1) == 768
    x = normal([3, 3072], seed=4)
    _, indices = ops.topk_indices(x, 1000, "approx", 0.1)
    np.testing.assert_array_equal(
        numpy(indices), np.argsort(-x, axis=-1, kind="stable")[:, :1000])
    assert ops.expected_recall(3072, 1000, 0.1) == 1.0


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


# (n, k, recall_target): L by jax.lax.approx_max_k on CPU, where the float64
# formula differs (the estimate lands on a power-of-two boundary).
XLA_BOUNDARY_CASES = [((3996, 3, 0.999), 3996), ((63788, 1637, 0.95), 32000),
                      ((118800, 598, 0.99), 118800), ((1880, 392, 0.66), 1880)]


def random_bin_count_cases(rng, count):
    """(n, k, recall_target, rank): ordinary cases, and cases built to sit
    on the boundaries where float32 and float64 `recall_target` part."""
    cases = []
    for _ in range(count):
        n = int(np.exp(rng.uniform(0, np.log(2e5))))
        k = int(np.exp(rng.uniform(0, np.log(n)))) if n > 1 else 1
        r = rng.choice([
            rng.uniform(0.01, 1.0),
            1 - 10 ** -rng.uniform(0.3, 6),
            round(rng.uniform(0.5, 1.0), int(rng.integers(1, 5))),
            1.0])
        cases.append((max(n, k), k, float(r), int(rng.integers(1, 3))))
    # XLA: m = (1 - k) / log(double(float(r))); n // m's bit length picks L.
    # Where float32 and float64 give different m, n = 2^j * max(m) - 1 lies
    # between the two.
    while len(cases) < 2 * count:
        k = int(rng.integers(2, 5000))
        scale = 10 ** int(rng.integers(2, 5))  # r: 2 to 4 decimals
        r = int(rng.integers(0.6 * scale, scale)) / scale
        m32 = int((1 - k) / np.log(float(np.float32(r))))
        m64 = int((1 - k) / np.log(r))
        if m32 != m64 and min(m32, m64) >= 128:
            j = int(rng.integers(1, 5))
            cases.append((2 ** j * max(m32, m64) - 1, k, r, 2))
    return cases


def test_bin_count_matches_xla():
    """`approx_bin_count` against XLA itself: `jax.lax.approx_max_k(...,
    aggregate_to_topk=False)` returns `L` entries on CPU. Its shape rule
    calls XLA's `ApproxTopKReductionOutputSize` (the C++ that TPUs run), so
    `jax.eval_shape` checks thousands of cases in about a second."""
    import jax
    import jax.numpy as jnp
    if backend.BACKEND == "tensorflow":
        jax.config.update("jax_platforms", "cpu")  # leave a TPU to TF

    def xla_bin_count(n, k, r, rank):
        shape = (1, n) if rank == 2 else (n,)
        out, _ = jax.eval_shape(
            lambda x: jax.lax.approx_max_k(
                x, k, recall_target=r, aggregate_to_topk=False),
            jax.ShapeDtypeStruct(shape, jnp.float32))
        return out.shape[-1]

    for (n, k, r), bins in XLA_BOUNDARY_CASES + [
            ((3072, 64, 0.95), 1536), ((3072, 128, 0.95), 3072)]:
        values, _ = jax.lax.approx_max_k(
            jnp.zeros((2, n), jnp.float32), k, recall_target=r,
            aggregate_to_topk=False)
        assert values.shape == (2, bins)  # run on CPU: the true output
        assert xla_bin_count(n, k, r, 2) == bins
        assert ops.approx_bin_count(n, k, r) == bins

    cases = random_bin_count_cases(np.random.default_rng(0), 1500)
    mismatches = [(case, ops.approx_bin_count(*case), xla_bin_count(*case))
                  for case in cases
                  if ops.approx_bin_count(*case) != xla_bin_count(*case)]
    assert not mismatches, mismatches[:10]


def test_auto_and_approx_use_approx_max_k_on_tpu(monkeypatch):
    # The backend's own op: tf.math.approx_max_k or jax.lax.approx_max_k.
    if backend.BACKEND == "jax":
        import jax
        module, name = jax.lax, "approx_max_k"
    else:
        import tensorflow as tf
        module, name = tf.math, "approx_max_k"
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(ops, "on_tpu", lambda: True)
    monkeypatch.setattr(module, name,
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    x = normal([4, 256], seed=9)
    y = ops.topk_mask(x, 8, method="auto", recall_target=0.9)
    assert calls == [{"recall_target": 0.9}]
    # approx_max_k is exact off TPU.
    np.testing.assert_array_equal(numpy(y), reference_topk_mask(x, 8))
    if "float64" in backend.FLOAT_DTYPES:
        with pytest.raises(TypeError, match="float64"):
            ops.topk_mask(x.astype("float64"), 8, method="approx")
    monkeypatch.setattr(ops, "on_tpu", lambda: False)
    assert ops.resolve_method("auto").name == "exact"


@pytest.mark.parametrize("k,match", [
    (0, "positive int"), (-3, "positive int"), (2.0, "positive int"),
    (True, "positive int"), (9, "larger than"),
    (np.float64(2.0), "positive int"), (np.bool_(True), "positive int"),
    (np.array(2.5), "positive int"), (np.int64(0), "positive int"),
    (np.int64(9), "choose 0 < k <= 8")])
def test_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        ops.topk_mask(np.ones([2, 8], "float32"), k)
    with pytest.raises(ValueError, match="k"):
        ops.validate_k(k, 8)


@pytest.mark.parametrize("k", [
    np.int64(3), np.int32(3), np.uint8(3), np.array(3), np.array(3, "int16")])
def test_k_accepts_integral_numbers(k):
    assert ops.validate_k(k, 8) == 3 and type(ops.validate_k(k)) is int
    x = normal([2, 8], seed=1)
    for method in sorted(ops.METHODS):
        values, indices = ops.topk_activations(x, k, method)
        assert values.shape == indices.shape == (2, 3)
        np.testing.assert_array_equal(numpy(ops.topk_mask(x, k, method)),
                                      numpy(ops.topk_mask(x, 3, method)))
    assert ops.approx_bin_count(np.int64(3072), k, 0.9) == \
        ops.approx_bin_count(3072, 3, 0.9)
    assert ops.expected_recall(np.int64(3072), np.int64(64)) == \
        ops.expected_recall(3072, 64)


def test_bad_inputs():
    ones = np.ones([2, 8], "float32")
    with pytest.raises(ValueError, match="Unknown method"):
        ops.topk_mask(ones, 2, method="fast")
    with pytest.raises(ValueError, match="recall_target"):
        ops.topk_mask(ones, 2, recall_target=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        ops.topk_mask(ones.astype("int32"), 2)
    with pytest.raises(ValueError, match="rank >= 1"):
        ops.topk_mask(np.float32(1.0), 1)
    if backend.BACKEND == "tensorflow":  # JAX knows every size when tracing
        import tensorflow as tf
        with pytest.raises(ValueError, match="last axis"):
            tf.function(lambda x: ops.topk_mask(x, 2)).get_concrete_function(
                tf.TensorSpec([2, None]))
        with pytest.raises(ValueError, match="rank >= 1"):
            tf.function(lambda x: ops.topk_mask(x, 2)).get_concrete_function(
                tf.TensorSpec(None))


def _input_kinds():
    """What `keras.ops.convert_to_tensor` accepts, as makers from numpy."""
    kinds = {"list": lambda a: a.tolist(),
             "tensor": keras.ops.convert_to_tensor,
             "keras.Variable": keras.Variable}
    if backend.BACKEND == "tensorflow":
        import tensorflow as tf
        kinds["tf.Variable"] = tf.Variable
    return kinds


_PUBLIC_OPS = {  # name: arguments from numpy operands
    "topk_mask": lambda x, indices, kernel: (x, 4),
    "topk_indices": lambda x, indices, kernel: (x, 4),
    "topk_activations": lambda x, indices, kernel: (x, 4),
    "statistical_cutoff": lambda x, indices, kernel: (x, 4),
    "project": lambda x, indices, kernel: (x, kernel),
    "sparse_mlp_product": lambda x, indices, kernel: (
        x[:, :4], indices, kernel),
    "indices_to_mask": lambda x, indices, kernel: (indices, 16, "float32"),
}


@pytest.mark.parametrize("kind", sorted(_input_kinds()))
@pytest.mark.parametrize("name", sorted(_PUBLIC_OPS))
def test_every_public_op_takes_what_convert_to_tensor_takes(name, kind):
    operands = (normal([3, 16], seed=0),
                np.arange(12, dtype="int32").reshape(3, 4),
                normal([16, 5], seed=1))
    arguments = _PUBLIC_OPS[name](*operands)
    make = _input_kinds()[kind]
    converted = [make(a) if isinstance(a, np.ndarray) else a
                 for a in arguments]
    op = getattr(ops, name)
    for got, want in zip(keras.tree.flatten(op(*converted)),
                         keras.tree.flatten(op(*arguments))):
        np.testing.assert_array_equal(numpy(got), numpy(want))


def reference_statistical(x, k):
    """numpy: keep the positive entries above mean + std * Φ⁻¹(1 - k/n)."""
    from scipy.stats import norm
    x64 = x.astype(np.float64)
    cutoff = x64.mean(-1, keepdims=True) + norm.ppf(1 - k / x.shape[-1]) \
        * x64.std(-1, keepdims=True)
    return np.where(x64 > np.maximum(cutoff, 0), x, 0).astype(x.dtype)


def test_statistical_keeps_what_exceeds_the_gaussian_cutoff():
    x = normal([512, 3072], seed=10) + np.float32(0.3)
    y = numpy(ops.topk_mask(x, 64, method="statistical"))
    expected = reference_statistical(x, 64)
    # float32 moments vs float64: entries within rounding of the cutoff may
    # flip; a handful at most.
    assert (y != expected).sum() <= 5
    counts = (y > 0).sum(-1)
    assert abs(counts.mean() - 64) < 2  # about k per row on Gaussian rows
    assert counts.std() < 12
    # A row with too few positives keeps only those; k == n is ReLU.
    small = np.array([[-1.0, -2.0, 3.0, -4.0]], "float32")
    np.testing.assert_array_equal(
        numpy(ops.topk_mask(small, 2, method="statistical")), [[0, 0, 3, 0]])
    np.testing.assert_array_equal(
        numpy(ops.topk_mask(small, 4, method="statistical")),
        np.maximum(small, 0))


def test_statistical_unknown_dims_gradient_jit_and_bfloat16():
    x = normal([3, 7, 256], seed=11)

    def loss_and_mask(x):
        y = ops.topk_mask(x, 16, method="statistical")
        return keras.ops.sum(y), y

    (_, y), grad = backend.with_unknown_dims(
        backend.value_and_grad(loss_and_mask), [None, None, 256])(x)
    y = numpy(y)
    np.testing.assert_array_equal(numpy(grad), (y != 0))
    jitted = compiled(lambda x: ops.topk_mask(x, 16, "statistical"), "jit")
    assert (numpy(jitted(x)) != y).sum() <= 2
    y16 = ops.topk_mask(keras.ops.cast(x, "bfloat16"), 16, "statistical")
    assert keras.backend.standardize_dtype(y16.dtype) == "bfloat16"
    assert abs(float(np.mean(numpy(y16 > 0))) * 256
               - float(np.mean(y > 0)) * 256) < 1


@pytest.mark.parametrize("method", sorted(ops.METHODS))
def test_topk_activations_feed_the_sparse_product(method):
    x = normal([4, 5, 96], seed=1)
    kernel = normal([96, 12], seed=2)
    values, indices = ops.topk_activations(x, 10, method)
    assert values.shape == indices.shape == (4, 5, 10)
    kept = numpy(ops.topk_mask(x, 10, method))
    if method == "statistical":  # some rows pass more than k: cover both
        counts = (kept > 0).sum(-1)
        assert counts.max() > 10 and counts.min() <= 10
    # The gathered product sums the k largest of the kept activations.
    expected = reference_topk_mask(kept, 10) @ kernel
    np.testing.assert_allclose(
        numpy(ops.sparse_mlp_product(values, indices, kernel)),
        expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="statistical"):
        ops.topk_indices(x, 10, "statistical")


def with_nan_tokens(seed, shape=(2, 3, 512)):
    """`(clean, x, nan_tokens)`: normal rows, the same with NaNs in two
    tokens (a +NaN past the first k; two -NaN, one at position 0), and
    which tokens hold them."""
    clean = normal(shape, seed=(12, seed))
    x = clean.copy()
    x[0, 1, 300] = np.nan
    x[1, 2, [0, 17]] = -np.nan
    return clean, x, np.isnan(x).any(-1)


@pytest.mark.parametrize("mode", backend.MODES)
@pytest.mark.parametrize("method", sorted(ops.METHODS))
def test_nan_token_propagates_and_leaves_other_tokens(method, mode):
    k, n = 8, 512
    assert ops.approx_bin_count(n, k, 0.9) < n  # "approx" bins for real
    clean, x, nan_tokens = with_nan_tokens(1)
    kernel = normal([n, 4], seed=(12, 2))
    masked_grad = backend.value_and_grad(
        lambda x: (keras.ops.sum(ops.topk_mask(x, k, method, 0.9)),))
    values_grad = backend.value_and_grad(
        lambda x: (keras.ops.sum(ops.topk_activations(x, k, method, 0.9)[0]),))

    @lambda f: compiled(f, mode)
    def run(x):
        masked = ops.topk_mask(x, k, method, 0.9)
        values, indices = ops.topk_activations(x, k, method, 0.9)
        return (masked, values, indices, masked_grad(x)[1],
                values_grad(x)[1], keras.ops.matmul(masked, kernel),
                ops.sparse_mlp_product(values, indices, kernel))

    got = [numpy(t) for t in run(x)]
    want = [numpy(t) for t in run(clean)]
    # Every other token: exactly its NaN-free result, gradients included.
    for got_t, want_t in zip(got, want):
        np.testing.assert_array_equal(got_t[~nan_tokens], want_t[~nan_tokens])
    masked, values, indices, _, _, dense_out, sparse_out = (
        t[nan_tokens] for t in got)
    # The NaN token: k NaN activations at 0..k-1 on both paths, and so a
    # NaN MLP output.
    assert np.isnan(values).all()
    np.testing.assert_array_equal(indices, np.broadcast_to(np.arange(k),
                                                           indices.shape))
    assert np.isnan(np.take_along_axis(masked, indices, -1)).all()
    assert (np.isnan(masked) | (masked == 0)).all()
    if method == "statistical":
        assert np.isnan(masked).all()
    assert np.isnan(dense_out).all() and np.isnan(sparse_out).all()
    if method != "statistical":
        values, indices = (numpy(t) for t in compiled(
            lambda x: ops.topk_indices(x, k, method, 0.9), mode)(x))
        clean_values, clean_indices = (numpy(t) for t in ops.topk_indices(
            clean, k, method, 0.9))
        np.testing.assert_array_equal(values[~nan_tokens],
                                      clean_values[~nan_tokens])
        np.testing.assert_array_equal(indices[~nan_tokens],
                                      clean_indices[~nan_tokens])
        assert np.isnan(values[nan_tokens]).all()
        assert (indices[nan_tokens] == np.arange(k)).all()


@pytest.mark.parametrize("method", sorted(ops.METHODS))
def test_nan_row_keeps_nan_not_its_largest_values(method):
    # Before: exact kept both NaNs and dropped 5 and 4.
    x = np.array([3.0, np.nan, 2.0, 5.0, -1.0, np.nan, 1.0, 4.0], "float32")
    out = numpy(ops.topk_mask(x, 2, method))
    if method == "statistical":
        assert np.isnan(out).all()
    else:
        np.testing.assert_array_equal(
            np.isnan(out), [1, 1, 0, 0, 0, 1, 0, 0])
        assert (out[~np.isnan(out)] == 0).all()
    values, indices = ops.topk_activations(x, 2, method)
    assert np.isnan(numpy(values)).all()
    np.testing.assert_array_equal(numpy(indices), [0, 1])


# The other backend ----------------------------------------------------------

def outputs_on_this_backend(x):
    """`{name: numpy array}`: Top-k of `x` by method, and the gathered
    product, as this process's backend computes them."""
    out = {}
    for method in sorted(ops.METHODS):
        out[f"{method}/mask"] = ops.topk_mask(x, 24, method, 0.9)
        values, indices = ops.topk_activations(x, 24, method, 0.9)
        out[f"{method}/values"], out[f"{method}/indices"] = values, indices
        out[f"{method}/product"] = ops.sparse_mlp_product(
            values, indices, x[0, :16].T.copy())
    return {name: numpy(value) for name, value in out.items()}


def test_the_other_backend_gives_the_same_outputs(tmp_path):
    """Top-k by method, with ties, a NaN token and the gathered product,
    here and under the other Keras backend (a subprocess), same inputs."""
    import os
    import pathlib
    import subprocess
    import sys
    x = normal([2, 512, 768], seed=14)
    x[0, 3, 100:110] = 2.5  # ties at the k-th value
    x[1, 7, 5] = np.nan
    np.save(tmp_path / "x.npy", x)
    other = {"tensorflow": "jax", "jax": "tensorflow"}[backend.BACKEND]
    subprocess.run(
        [sys.executable, "-c",
         "import sys, numpy as np\n"
         "from tests.test_ops import outputs_on_this_backend\n"
         "np.savez(sys.argv[2], **outputs_on_this_backend("
         "np.load(sys.argv[1])))", str(tmp_path / "x.npy"),
         str(tmp_path / "other.npz")],
        check=True, timeout=300, cwd=pathlib.Path(__file__).parent.parent,
        env={**os.environ, "KERAS_BACKEND": other})
    theirs = dict(np.load(tmp_path / "other.npz"))
    ours = outputs_on_this_backend(x)
    # Where fewer than k pass its cutoff, "statistical" fills with zeros,
    # whose order differs (JAX ranks -0.0 below 0.0): compare the indices
    # of kept entries only.
    for out in (ours, theirs):
        out["statistical/indices"] = np.where(
            out["statistical/values"] != 0, out["statistical/indices"], -1)
    for key, ours in ours.items():
        if "statistical" in key:
            # float32 moments summed in another order: entries at the
            # cutoff may flip (and the product rows that hold them).
            differ = ~np.isclose(ours, theirs[key], rtol=1e-5, atol=1e-5,
                                 equal_nan=True)
            assert differ.sum() <= 8 * (16 if "product" in key else 1), key
        else:
            rtol = 1e-5 if key.endswith("product") else 0
            np.testing.assert_allclose(ours, theirs[key], rtol=rtol,
                                       atol=rtol, equal_nan=True, err_msg=key)


@pytest.mark.parametrize("name", sorted(ops.METHODS))
def test_each_method_record_says_what_it_does(name):
    """`approximate`: whether it may miss the exact top-k; `selects_indices`:
    whether it keeps exactly k entries (and the gathered path the same)."""
    method = ops.METHODS[name]
    x = normal([64, 512], seed=3)
    kept = numpy(ops.topk_mask(x, 16, name)) != 0
    exact = numpy(ops.topk_mask(x, 16, "exact")) != 0
    if not method.approximate:
        np.testing.assert_array_equal(kept, exact)
    if method.selects_indices:
        assert (kept.sum(axis=1) == 16).all()
        values, indices = ops.topk_activations(x, 16, name)
        np.testing.assert_array_equal(
            np.sort(numpy(indices), axis=1),
            np.sort(np.argwhere(kept)[:, 1].reshape(64, 16), axis=1))
    assert ops.gathers("auto", name, 16, 1, 512) == method.selects_indices
