"""Top-k activation sparsity as `keras.ops` functions, on every backend.

No layers here: the same functions serve the Keras 3 layers of this package
on the TensorFlow and the JAX backend, tf_keras / Model Garden blocks (as an
`inner_activation`, TensorFlow backend) and plain `tf.function` or
`jax.jit` code. What only a backend can do (TPU's `approx_max_k`, whether we
are on a TPU, whether XLA compiles the code being traced) is
`topk_sparse.backend`.

The Top-k MLP of *The Lazy Neuron Phenomenon* (arXiv 2210.06313) computes
`V · TopK_k(relu(Kᵀx))` per token. This module provides:

- `METHODS`: the Top-k methods, each a record of how it selects and what
  the layers need to know of it; `gathers`: when an MLP call takes the
  gathered path;
- `topk_indices`: per row (last axis), the positions and values of the `k`
  largest activations, by one of the `METHODS`;
- `topk_mask`: ReLU, then keep per row those `k` activations, zero the rest;
- `topk_activations`: the same kept activations as `(values, indices)`;
- `sparse_mlp_product`: the second MLP projection computed from the kept
  activations only, by gathering `k` rows of the output kernel.
- `project`: `x @ kernel + bias` over the last axis as one rank-2 matmul,
  the MLP's dense projections.

The `"exact"` and `"approx"` methods select *indices* and the mask is built
from them, so the masked and the gathered paths keep exactly the same
entries. The tie rule is that of `top_k` on both backends
(`tf.math.top_k`, `jax.lax.top_k`): among equal values the lower index
wins, so a row keeps exactly `k` entries (and fewer nonzeros when fewer
than `k` are positive). `"statistical"` instead keeps what exceeds a
per-row cutoff estimated from the row's mean and standard deviation: about
`k` entries, in linear time and without a sort.

NaN policy: NaN in, NaN out, per token. A row (token) whose input holds a
NaN keeps `k` NaN activations, at positions `0..k-1`, for every method:
`topk_indices` and `topk_activations` return `k` NaN values there, and
`topk_mask` is NaN there (for `"statistical"`, whose cutoff is then NaN,
across the whole row), else 0, or NaN where the input was NaN. So the
token's MLP output is NaN on the masked and the gathered path alike and a
loss over it is NaN, while every other row is exactly what it is without
that row. `"statistical"` treats a row holding an infinity the same way
(its cutoff is NaN too). The sparsity metrics (`topk_sparse.sparsity`)
skip such tokens. Without this policy `top_k`'s ranking of NaNs would
decide what a NaN row keeps, and it differs by backend and kernel.
The NaN goes into the `k` mask updates per row, not the whole row, so that
`"exact"` and `"approx"` add no elementwise op over `[rows, n]`: only one
row sum, read without a write (measured: benchmarks/README.md, design
measurements).

Why indices and not a value threshold: under XLA on CPU, a `top_k` whose
indices are unused is rewritten into a full sort of the row (a 3.2x train
step, benchmarks/README.md); with the indices consumed it stays XLA's
`TopK` kernel.
"""

import dataclasses
import fractions
import math
import statistics

import keras
from keras import ops
import numpy as np

from topk_sparse import backend, checks

@dataclasses.dataclass(frozen=True)
class Method:
    """A Top-k method: how it selects, and what the layers need to know.

    Attributes:
      name: str. The `method=` argument.
      select: `(x, k, recall_target) -> (values, indices)`, `[..., k]`:
        the `k` entries kept per row of `x` (checked, without gradient),
        values sorted descending; None for a method that keeps what
        exceeds a cutoff instead (`"statistical"`).
      approximate: bool. Whether it may miss some of the exact top-k: a
        layer then measures its recall (`sparsity.TopKRecall`).
    """
    name: str
    select: object
    approximate: bool

    @property
    def selects_indices(self):
        """Whether it keeps exactly `k` entries chosen by index, so that
        the masked and the gathered path keep the same ones (`"auto"`
        gathers only then)."""
        return self.select is not None


def _exact_top_k(x, k, recall_target):
    del recall_target  # exact
    return ops.top_k(x, k, sorted=True)


def _approx_top_k(x, k, recall_target):
    """`approx_max_k` on TPU, TPU-KNN's algorithm in portable ops
    elsewhere (where `approx_max_k` itself is exact)."""
    if not on_tpu():
        return _binned_top_k(x, k, recall_target)
    if keras.backend.standardize_dtype(x.dtype) == "float64":
        raise TypeError(
            "approx_max_k supports float16, bfloat16 and float32 only: "
            "cast the float64 input to float32.")
    return backend.approx_max_k(x, k, recall_target)


METHODS = {method.name: method for method in (
    Method("exact", _exact_top_k, approximate=False),
    Method("approx", _approx_top_k, approximate=True),
    Method("statistical", None, approximate=True),
)}
"""Top-k methods by name. `"exact"`: `keras.ops.top_k`. `"approx"`:
TPU-KNN's binned approximation (`approx_max_k` on TPU, the same algorithm
in portable ops elsewhere). `"statistical"`: the Gaussian cutoff of Spark
Transformer (arXiv 2506.06644), keeping about `k` per row. A new method is
one entry here (and its tests in tests/test_ops.py). `"auto"`, which every
`method=` argument also takes, is `resolve_method`'s choice per device."""

METHOD_NAMES = ("auto", *METHODS)

IMPLEMENTATIONS = ("masked", "gather", "auto")
"""How a Top-k MLP computes its second projection: `"masked"` zeroes the
dropped activations and multiplies the whole kernel, `"gather"` reads only
the kept rows, `"auto"` decides per call (`gathers`)."""

GATHER_MAX_SHARE = fractions.Fraction(1, 6)  # exact: no rounding at the edge
"""`implementation="auto"` gathers when a call reads at most this share of
the output kernel's rows: `tokens * k <= GATHER_MAX_SHARE * mlp_dim`
(hidden 3072, k=64: up to 8 tokens; k=256: 2).

The gather pays while the `tokens * k` rows it reads stay a small part of
the kernel a dense pass reads once (measured: benchmarks/README.md,
inference).
"""

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# XLA's approx_topk_shape.cc reduces in tiles of one TPU lane (128) for
# operands of rank 2 and more, and of 1024 for rank 1.
_TPU_LANE_TILING = 128
_TPU_CHUNK_TILING = 1024


def validate_k(k, size=None):
    """`k` as a Python int if it is an integral number (`int`, `np.int64`,
    a 0-d integer array; not a bool or a float) in `[1, size]`, else
    raises `ValueError`."""
    k = checks.positive_int(
        k, "k (the number of activations kept per token)")
    if size is not None and k > size:
        raise ValueError(
            f"k={k} is larger than the dimension it selects from ({size}): "
            f"choose 0 < k <= {size}."
        )
    return k


def validate_method(method):
    if method not in METHOD_NAMES:
        raise ValueError(
            f"Unknown method {method!r}: choose one of {METHOD_NAMES}.")
    return method


def validate_implementation(implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown implementation {implementation!r}: choose one of "
            f"{IMPLEMENTATIONS}.")
    return implementation


def max_gathered_tokens(mlp_dim, rows_per_token):
    """The most tokens a call may have while reading `rows_per_token` rows
    per token keeps to `GATHER_MAX_SHARE` of `mlp_dim` (0: none)."""
    return int(GATHER_MAX_SHARE * mlp_dim // rows_per_token)


def gathers(implementation, method, k, tokens, mlp_dim):
    """Whether a Top-k MLP call takes the gathered path: the rule of every
    MLP here (`SparseMLP`, Model Garden's `TopKFeedforward`).

    Args:
      implementation: one of `IMPLEMENTATIONS`.
      method: one of `METHOD_NAMES`.
      k: int or None (dense: never gathers).
      tokens: int or None. The call's static token count (None: unknown,
        `"auto"` masks).
      mlp_dim: int. The hidden width.
    """
    if k is None:
        return False
    if implementation != "auto":
        return implementation == "gather"
    if not resolve_method(method).selects_indices:  # paths differ past k
        return False
    return tokens is not None and tokens <= max_gathered_tokens(mlp_dim, k)


def validate_recall_target(recall_target):
    if not 0.0 < float(recall_target) <= 1.0:
        raise ValueError(
            f"recall_target must be in (0, 1], got {recall_target!r}."
        )
    return float(recall_target)


def on_tpu():
    """True when this process computes on TPU devices (per backend)."""
    return backend.on_tpu()


def resolve_method(method):
    """The `Method` that `method` (a name) runs here, `"auto"` resolved."""
    validate_method(method)
    if method == "auto":
        # Off TPU, approx_max_k itself is exact (on both backends) and the
        # portable binned approximation is not faster than top_k at
        # Transformer sizes (benchmarks/topk_mlp.py): exact is the fast one.
        method = "approx" if on_tpu() else "exact"
    return METHODS[method]


def approx_bin_count(n, k, recall_target=0.95, rank=2):
    """Number of bins `L` that TPU-KNN reduces `n` inputs to before top-k.

    XLA's `ApproxTopKReductionOutputSize` (xla/client/lib/approx_topk_shape.cc,
    aggregate_to_topk=False), reproduced value for value: keeping the
    maximum of each of `L` bins keeps each of the top `k` with probability at
    least `((L-1)/L)^(k-1)`, so `L ~ (1-k)/ln(recall_target)`, rounded to TPU
    tiles and to a power-of-two reduction. `L == n` means the reduction is
    exact. XLA takes `recall_target` as a C++ `float`: it is rounded to
    float32 here too before the `== 1` test and the logarithm (in double), or
    `L` differs where the estimate lands on a power-of-two boundary (n=3996,
    k=3, recall_target=0.999: float64 gives 2048, XLA 3996).
    `tests/test_ops.py` checks this against `jax.lax.approx_max_k`.

    Args:
      n: int. Size of the reduced (last) dimension.
      k: int. Number of entries kept.
      recall_target: float in (0, 1]. Expected recall asked for.
      rank: int. Rank of the operand (rank 1 uses larger tiles).

    Returns:
      int. The bin count `L <= n`. XLA's formula can give `L < k` (fewer
      bins than entries kept) when `recall_target` is below about `1/e`;
      the portable binned path is then exact.
    """
    n = checks.positive_int(n, "n")
    k = validate_k(k, n)
    recall_target = validate_recall_target(recall_target)
    # XLA's C++ signature reads `float recall_target`.
    recall_target = float(np.float32(recall_target))
    if recall_target <= 0.0:
        raise ValueError(
            "recall_target rounds to 0 in float32, the precision in which "
            "XLA reads it: choose a larger recall_target.")
    tiling = _TPU_CHUNK_TILING if rank == 1 else _TPU_LANE_TILING
    if n <= tiling:
        return n
    if k == 1:
        return tiling
    if recall_target == 1.0:
        return n
    # C++ truncates the double quotient to uint64, as int() does.
    m = min(max(int((1.0 - k) / math.log(recall_target)), tiling), n)
    log2_reduction = (n // m).bit_length() - 1
    if log2_reduction <= 0:
        return n
    log2_reduction = min(log2_reduction, _log2_ceil(n // tiling))
    return _ceil_div(_ceil_div(n, tiling), 1 << log2_reduction) * tiling


def _ceil_div(a, b):
    return -(-a // b)


def _log2_ceil(value):
    return 0 if value <= 1 else (value - 1).bit_length()


def expected_recall(n, k, recall_target=0.95, rank=2):
    """Expected recall of the portable binned top-k (`_binned_top_k`).

    The top `k` of a row with iid entries sit at a uniformly random
    `k`-subset of the `n` positions. The binned top-k puts position `i` in
    bin `i mod L` (so bin `b` holds `s_b` positions, `ceil(n/L)` or one
    fewer) and keeps the maxima of the `k` bins with the largest maxima:
    a bin holding any of the top `k` has one of them as its maximum, and
    those maxima outrank every other bin's. So it keeps exactly one of the
    top `k` per bin that holds any, and

        E[recall] = (1/k) sum_b [1 - C(n - s_b, k) / C(n, k)]

    (hypergeometric: `C(n - s_b, k) / C(n, k)` is the chance that bin `b`
    holds none of them). Computed exactly in integers. The model of
    independent uniform bins, `(L/k)(1 - (1 - 1/L)^k)`, under-estimates it
    (by 0.037 at n=3072, k=256, recall_target=0.8), and XLA's
    `((L-1)/L)^(k-1)` is a lower bound on both. Inputs with structure
    (hot neurons sharing a bin) can fall below it.

    Args:
      n, k, recall_target, rank: as for `approx_bin_count`.

    Returns:
      float in (0, 1]; 1.0 when the binned path is exact (`L >= n`, or
      `L < k`).
    """
    bins = approx_bin_count(n, k, recall_target, rank)
    n, k = int(n), int(k)
    if bins >= n or bins < k:
        return 1.0
    size = _ceil_div(n, bins)  # positions in each of the first `full` bins
    full = n - (size - 1) * bins
    missed = (full * math.comb(n - size, k)
              + (bins - full) * math.comb(n - size + 1, k))
    # Python divides the integers with one correct rounding.
    return (bins - missed / math.comb(n, k)) / k


def _check_operand(x, k):
    """`(x, k)`: `x` as a float tensor with a known last dimension, `k` as a
    Python int in `[1, x.shape[-1]]`; else raises."""
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"Top-k needs floating-point activations, got dtype {dtype}: "
            f"cast the input to float32 or bfloat16."
        )
    rank = _rank(x)
    if rank is None or rank < 1:
        raise ValueError(
            f"Top-k needs an input of rank >= 1 with a known last dimension, "
            f"got shape {x.shape}."
        )
    size = x.shape[-1]
    if size is None:
        raise ValueError(
            f"Top-k selects along the last axis, whose size must be known "
            f"when the graph is built; got shape {x.shape}."
        )
    return x, validate_k(k, size)


def _rank(x):
    """The rank of `x` (variables have no `ndim`); None where TensorFlow
    does not know it."""
    try:
        return len(x.shape)
    except ValueError:  # TensorFlow's unknown rank has no length
        return None


def topk_indices(x, k, method="auto", recall_target=0.95):
    """Values and indices of the `k` largest entries of each row of `x`.

    Args:
      x: float tensor `[..., n]` (pre- or post-ReLU activations).
      k: int. Entries kept per row, `0 < k <= n`.
      method: one of `METHODS` but `"statistical"`, which selects no
        indices.
      recall_target: float in (0, 1]. Expected recall of the `"approx"`
        method (ignored by `"exact"`).

    Returns:
      `(values, indices)`, each `[..., k]`; values sorted descending, indices
      int32. A row holding a NaN gets NaN values at indices `0..k-1` (the
      module's NaN policy). No gradient flows through this selection:
      callers multiply by a mask (see `topk_mask`) or gather (see
      `sparse_mlp_product`) instead, which also avoids `approx_max_k`'s
      registered gradient, which fails on unknown (None) dimensions.
    """
    x, k = _check_operand(x, k)
    x = ops.stop_gradient(x)
    method = _index_method(method, recall_target)
    # Any sign of input: an exact test, off the layers' hot path.
    nan_rows = ops.any(ops.isnan(x), axis=-1, keepdims=True)
    return _select(x, k, method, recall_target, nan_rows)


def _index_method(method, recall_target):
    """The `Method` that selects indices here; raises for bad arguments."""
    validate_recall_target(recall_target)
    method = resolve_method(method)
    if not method.selects_indices:
        raise ValueError(
            f'method="{method.name}" keeps entries above a cutoff, not k '
            f'indices: use topk_mask or topk_activations.')
    return method


def _nan_rows(activations):
    """`[..., 1]` bool: the rows of post-ReLU `activations` that hold a NaN.

    One row sum and no `[..., n]` temporary: a sum of entries that are
    >= 0 or +inf is NaN exactly when one of them is NaN (whatever the
    summation order), which `top_k`'s ranking of NaNs cannot tell."""
    return ops.isnan(ops.sum(activations, axis=-1, keepdims=True))


def _select(x, k, method, recall_target, nan_rows):
    """`topk_indices` of the operand `x` (checked, without gradient) by
    `method` (a `Method` that selects indices), with the rows flagged in
    `nan_rows` (`[..., 1]`) set to NaN values at indices `0..k-1`:
    `[..., k]`-sized selects only."""
    values, indices = method.select(x, k, recall_target)
    values = ops.where(nan_rows, ops.cast(math.nan, values.dtype), values)
    indices = ops.where(nan_rows, ops.arange(k, dtype=indices.dtype),
                        indices)
    return values, indices


def _binned_top_k(x, k, recall_target):
    """TPU-KNN's algorithm in portable ops: max of `L` strided bins, then top-k.

    Entry `i` of a row falls in bin `i mod L` (strided bins, which meet the
    recall model of arXiv 2206.14286); the kept entries are the maxima of the
    `k` bins with the largest maxima. Exact top-k when `L >= n`, and when
    `L < k` (fewer bins than entries kept, `recall_target` below about
    `1/e`).
    """
    n = x.shape[-1]
    bins = approx_bin_count(n, k, recall_target, rank=len(x.shape))
    if bins >= n or bins < k:
        return ops.top_k(x, k, sorted=True)
    groups = _ceil_div(n, bins)
    out_shape = (*_leading_shape(x), k)
    rows = ops.reshape(x, (-1, n))
    pad = groups * bins - n
    if pad:
        # -inf, so that a bin's argmax never lands on padding (ties go to
        # the lower, real index, even for a bin of -inf entries).
        rows = ops.pad(rows, [[0, 0], [0, pad]], constant_values=-math.inf)
    grid = ops.reshape(rows, (-1, groups, bins))
    # Each bin's maximum and its group, in one pass over the `n / L` groups
    # (2 to 24 at mlp_dim 3072; the loop unrolls into the graph):
    # `keras.ops.argmax` would add four `[rows, n]` ops on TensorFlow (its
    # -0.0 fix). Strictly greater: ties keep the lower group, so the lower
    # index.
    bin_max = grid[:, 0]
    bin_arg = ops.zeros_like(bin_max, "int32")
    for group in range(1, groups):
        greater = grid[:, group] > bin_max
        bin_max = ops.where(greater, grid[:, group], bin_max)
        bin_arg = ops.where(greater, group, bin_arg)
    values, top_bins = ops.top_k(bin_max, k, sorted=True)
    group = ops.take_along_axis(bin_arg, top_bins, axis=1)
    indices = group * bins + top_bins
    return ops.reshape(values, out_shape), ops.reshape(indices, out_shape)


def _leading_shape(x):
    """The shape of `x` but its last axis, for `reshape`: static sizes as
    ints, one unknown size as -1, several as the runtime sizes."""
    lead = tuple(x.shape[:-1])
    if sum(size is None for size in lead) <= 1:
        return tuple(-1 if size is None else size for size in lead)
    return tuple(ops.shape(x)[:-1])


def indices_to_mask(indices, n, dtype):
    """A `[..., n]` tensor of `dtype`: 1 at `indices` (`[..., k]`), else 0."""
    indices = ops.convert_to_tensor(indices)
    return _scatter_rows(indices, ops.ones_like(indices, dtype), n)


def _scatter_rows(indices, updates, n):
    """A `[..., n]` tensor: `updates` (`[..., k]`) at `indices`, else 0."""
    k = indices.shape[-1]
    flat = ops.reshape(indices, (-1, k))
    num_rows = ops.shape(flat)[0]
    row_ids = ops.broadcast_to(
        ops.arange(num_rows, dtype=flat.dtype)[:, None], ops.shape(flat))
    coords = ops.stack([row_ids, flat], axis=-1)
    mask = ops.scatter(ops.reshape(coords, (-1, 2)),
                       ops.reshape(updates, (-1,)), (num_rows, n))
    return ops.reshape(mask, (*_leading_shape(indices), n))


def statistical_cutoff(x, k):
    """Per-row cutoff above which about `k` of the `n` entries lie.

    `mean + std · Φ⁻¹(1 - k/n)` over the last axis: exact in expectation for
    Gaussian rows, which pre-activations of wide layers roughly are (Spark
    Transformer, arXiv 2506.06644). Linear time, no sort; moments in float32.
    A row whose entries are all equal (std 0) keeps none of them. A row
    holding a NaN or an infinity (whose mean is not finite) gets a NaN
    cutoff: the module's NaN policy.

    Outside XLA the mean square is one row-wise dot product (`einsum`), so
    that the moments read the row twice instead of three times; under XLA
    the two-pass `E[(x - mean)²]` fuses and is kept (measured:
    benchmarks/README.md, design measurements). The one-pass variance loses
    about `eps · mean² / variance` of relative precision: nothing for
    pre-activations, whose mean is within a few standard deviations of 0.

    Returns:
      float32 `[..., 1]`, without gradient.
    """
    x, k = _check_operand(x, k)
    x = ops.cast(ops.stop_gradient(x), "float32")
    n = x.shape[-1]
    mean = ops.mean(x, axis=-1, keepdims=True)
    # Set on `[..., 1]` from the mean, whatever NaN does to max and sqrt.
    not_finite = ops.logical_not(ops.isfinite(mean))
    nan = ops.cast(math.nan, "float32")
    if k == n:
        return ops.where(not_finite, nan, ops.full_like(mean, -math.inf))
    z = statistics.NormalDist().inv_cdf(1.0 - k / n)
    if backend.compiled_by_xla():
        variance = ops.mean(ops.square(x - mean), axis=-1, keepdims=True)
    else:
        mean_square = ops.einsum("...i,...i->...", x, x)[..., None] / n
        variance = ops.maximum(mean_square - ops.square(mean), 0.0)
    return ops.where(not_finite, nan, mean + z * ops.sqrt(variance))


def _above_cutoff(x, k):
    """`(kept, nan_rows)`: ReLU, then zero what is not above the statistical
    cutoff; rows whose cutoff is NaN (`nan_rows`, `[..., 1]`) all NaN."""
    cutoff = statistical_cutoff(x, k)
    nan_rows = ops.isnan(cutoff)
    # Compared in float32: a bfloat16 cutoff would shift the kept count.
    threshold = ops.where(nan_rows, ops.cast(math.inf, "float32"),
                          ops.maximum(cutoff, 0.0))
    # 0 or NaN per row, added to the 0/1 mask: one `[..., n]` add outside
    # XLA (a broadcasting select measured slower), fused under XLA.
    fill = ops.where(nan_rows, ops.cast(math.nan, x.dtype),
                     ops.cast(0.0, x.dtype))
    mask = ops.cast(ops.cast(x, "float32") > threshold, x.dtype) + fill
    return x * mask, nan_rows


def topk_mask(x, k, method="auto", recall_target=0.95):
    """ReLU, then keep per row the `k` largest activations and zero the rest.

    The Top-k nonlinearity of arXiv 2210.06313. A row with fewer than `k`
    positive entries keeps only those. Gradients flow to the kept entries
    only. A row holding a NaN is NaN at the positions it keeps (see the
    module's NaN policy); other rows are unaffected.

    Args:
      x: float tensor `[..., n]`, the pre-activations; leading dimensions may
        be unknown (None).
      k: int. Activations kept per row, `0 < k <= n`.
      method: one of `METHODS` (see `topk_indices`); `"statistical"` keeps
        the positive entries above `statistical_cutoff(x, k)`, about `k`.
      recall_target: float in (0, 1]. Expected recall for `"approx"`.

    Returns:
      A tensor like `x`: `relu(x)` with all but the selected entries zeroed.

    Example:
    >>> keras.ops.convert_to_numpy(
    ...     topk_mask(np.array([[3.0, -1.0, 2.0, 5.0]], "float32"), k=2))
    array([[3., 0., 0., 5.]], dtype=float32)
    """
    x, k = _check_operand(x, k)
    if not resolve_method(method).selects_indices:
        return _above_cutoff(x, k)[0]
    method = _index_method(method, recall_target)
    activations = ops.relu(x)
    selected = ops.stop_gradient(activations)
    nan_rows = _nan_rows(selected)
    _, indices = _select(selected, k, method, recall_target, nan_rows)
    # 1 at the kept entries; NaN there in NaN rows (k updates, not n).
    updates = ops.where(nan_rows, ops.cast(math.nan, x.dtype),
                        ops.ones_like(indices, x.dtype))
    return activations * _scatter_rows(indices, updates, x.shape[-1])


def topk_activations(x, k, method="auto", recall_target=0.95):
    """The activations `topk_mask` keeps, as `(values, indices)`, `[..., k]`.

    The input of `sparse_mlp_product`. Values are differentiable. For
    `"statistical"`, the `k` largest of the entries above the cutoff, zeros
    where fewer pass it: equal to `topk_mask`'s when at most `k` pass. A row
    holding a NaN gets NaN values at indices `0..k-1`, for every method.
    """
    x, k = _check_operand(x, k)
    validate_recall_target(recall_target)
    if not resolve_method(method).selects_indices:
        activations, nan_rows = _above_cutoff(x, k)
        method = METHODS["exact"]  # the k largest of what passed
        selected = ops.stop_gradient(activations)
    else:
        method = _index_method(method, recall_target)
        activations = ops.relu(x)
        selected = ops.stop_gradient(activations)
        nan_rows = _nan_rows(selected)
    _, indices = _select(selected, k, method, recall_target, nan_rows)
    values = ops.take_along_axis(activations, indices, axis=-1)
    return ops.where(nan_rows, ops.cast(math.nan, values.dtype),
                     values), indices


def sparse_mlp_product(values, indices, kernel):
    """Second MLP projection from the kept activations only.

    `out[r] = sum_j values[r, j] * kernel[indices[r, j]]`: reads `k` rows of
    `kernel` per token instead of all of them, so its FLOPs fall with `k`
    (`2 k d` instead of `2 n d` per token).

    Args:
      values: float `[..., k]`, the kept activations (post-ReLU).
      indices: int `[..., k]`, their positions in the hidden dimension.
      kernel: float `[n, d]`, the output projection.

    Returns:
      float `[..., d]`.
    """
    values, indices, kernel = (ops.convert_to_tensor(t)
                               for t in (values, indices, kernel))
    rows = ops.take(kernel, indices, axis=0)  # [..., k, d]
    return ops.squeeze(ops.matmul(values[..., None, :], rows), axis=-2)


def project(x, kernel, bias=None):
    """`x @ kernel + bias` over the last axis, as one rank-2 matmul.

    Flattening first keeps the backward pass a plain matmul (an `einsum` over
    `...f,fd->...d` was seen here to build a [f, d, tokens] gradient).
    """
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    y = ops.matmul(ops.reshape(x, (-1, x.shape[-1])), kernel)
    if bias is not None:
        y = y + bias
    return ops.reshape(y, (*_leading_shape(x), kernel.shape[-1]))
