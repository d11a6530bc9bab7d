"""Top-k activation sparsity as pure TensorFlow functions.

No Keras here: the same functions serve the Keras 3 layers of this package,
tf_keras / Model Garden blocks (as an `inner_activation`) and plain
`tf.function` code.

The Top-k MLP of *The Lazy Neuron Phenomenon* (arXiv 2210.06313) computes
`V · TopK_k(relu(Kᵀx))` per token. This module provides:

- `topk_indices`: per row (last axis), the positions and values of the `k`
  largest activations, by one of the `METHODS`;
- `topk_mask`: ReLU, then keep per row those `k` activations, zero the rest;
- `topk_activations`: the same kept activations as `(values, indices)`;
- `sparse_mlp_product`: the second MLP projection computed from the kept
  activations only, by gathering `k` rows of the output kernel.

The `"exact"` and `"approx"` methods select *indices* and the mask is built
from them, so the masked and the gathered paths keep exactly the same
entries. The tie rule is that of `tf.math.top_k`: among equal values the
lower index wins, so a row keeps exactly `k` entries (and fewer nonzeros when
fewer than `k` are positive). `"statistical"` instead keeps what exceeds a
per-row cutoff estimated from the row's mean and standard deviation: about
`k` entries, in linear time and without a sort.

Why indices and not a value threshold: under `jit_compile=True` on CPU, XLA
rewrites a `top_k` whose indices are unused into a full sort of the row, and a
threshold-mask train step then costs 3.2x the dense step (2048 x 768 -> 3072,
measured here); with the indices consumed it stays XLA's `TopK` kernel
(1.06x-1.25x).
"""

import math
import statistics

import tensorflow as tf

METHODS = ("auto", "exact", "approx", "statistical")
"""Top-k methods. `"exact"`: `tf.math.top_k`. `"approx"`: TPU-KNN's binned
approximation (`tf.math.approx_max_k` on TPU, the same algorithm in portable
ops elsewhere). `"statistical"`: the Gaussian cutoff of Spark Transformer
(arXiv 2506.06644), keeping about `k` per row. `"auto"`: `"approx"` on TPU,
`"exact"` elsewhere."""

FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)

# XLA's approx_topk_shape.cc reduces in tiles of one TPU lane (128) for
# operands of rank 2 and more, and of 1024 for rank 1.
_TPU_LANE_TILING = 128
_TPU_CHUNK_TILING = 1024


def validate_k(k, size=None):
    """Returns `k` if it is a positive int no larger than `size`, else raises."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(
            f"k must be a positive int (the number of activations kept per "
            f"token), got {k!r}."
        )
    if size is not None and k > size:
        raise ValueError(
            f"k={k} is larger than the dimension it selects from ({size}): "
            f"choose 0 < k <= {size}."
        )
    return k


def validate_method(method):
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: choose one of {METHODS}.")
    return method


def validate_recall_target(recall_target):
    if not 0.0 < float(recall_target) <= 1.0:
        raise ValueError(
            f"recall_target must be in (0, 1], got {recall_target!r}."
        )
    return float(recall_target)


def on_tpu():
    """True when TensorFlow has initialized TPU devices in this process."""
    return bool(tf.config.list_logical_devices("TPU"))


def resolve_method(method):
    """The concrete method that `method` runs here (`"auto"` resolved)."""
    validate_method(method)
    if method == "auto":
        # Off TPU, approx_max_k itself is exact and the portable binned
        # approximation is not faster than top_k at Transformer sizes
        # (benchmarks/topk_mlp.py), so the exact method is the fast one.
        return "approx" if on_tpu() else "exact"
    return method


def approx_bin_count(n, k, recall_target=0.95, rank=2):
    """Number of bins `L` that TPU-KNN reduces `n` inputs to before top-k.

    The formula of XLA's `ApproxTopKReductionOutputSize`
    (xla/client/lib/approx_topk_shape.cc, aggregate_to_topk=False): keeping
    the maximum of each of `L` bins keeps each of the top `k` with
    probability at least `((L-1)/L)^(k-1)`, so `L ~ (1-k)/ln(recall_target)`,
    rounded to TPU tiles and to a power-of-two reduction. `L == n` means the
    reduction is exact.

    Args:
      n: int. Size of the reduced (last) dimension.
      k: int. Number of entries kept.
      recall_target: float in (0, 1]. Expected recall asked for.
      rank: int. Rank of the operand (rank 1 uses larger tiles).

    Returns:
      int. The bin count `L`, with `k <= L <= n`.
    """
    validate_k(k, n)
    recall_target = validate_recall_target(recall_target)
    tiling = _TPU_CHUNK_TILING if rank == 1 else _TPU_LANE_TILING
    if n <= tiling:
        return n
    if k == 1:
        return tiling
    if recall_target == 1.0:
        return n
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


def expected_recall(n, k, recall_target=0.95):
    """Expected recall of the binned top-k with random bin assignment.

    Each of the true top `k` is lost only when a larger one of them shares its
    bin; averaged over ranks this is `1 - (k-1)/(2L)` to first order. XLA's
    `((L-1)/L)^(k-1)` is the survival chance of the k-th item alone: a lower
    bound.
    """
    bins = approx_bin_count(n, k, recall_target)
    if bins >= n:
        return 1.0
    # Item of rank j survives iff none of the j-1 larger items is in its bin.
    return sum(((bins - 1) / bins) ** j for j in range(k)) / k


def _check_operand(x, k):
    x = tf.convert_to_tensor(x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"Top-k needs floating-point activations, got dtype {x.dtype.name}: "
            f"cast the input to float32 or bfloat16."
        )
    if x.shape.rank is None or x.shape.rank < 1:
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
    validate_k(k, size)
    return x


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
      int32. No gradient flows through this selection: callers multiply by a
      mask (see `topk_mask`) or gather (see `sparse_mlp_product`) instead,
      which also avoids `approx_max_k`'s registered gradient, which fails on
      unknown (None) dimensions.
    """
    x = tf.stop_gradient(_check_operand(x, k))
    validate_recall_target(recall_target)
    method = resolve_method(method)
    if method == "statistical":
        raise ValueError(
            'method="statistical" keeps entries above a cutoff, not k '
            'indices: use topk_mask or topk_activations.')
    if method == "exact":
        return tf.math.top_k(x, k, sorted=True)
    if on_tpu():
        if x.dtype == tf.float64:
            raise TypeError(
                "tf.math.approx_max_k supports float16, bfloat16 and float32 "
                "only: cast the float64 input to float32."
            )
        return tf.math.approx_max_k(x, k, recall_target=recall_target)
    return _binned_top_k(x, k, recall_target)


def _binned_top_k(x, k, recall_target):
    """TPU-KNN's algorithm in portable ops: max of `L` strided bins, then top-k.

    Entry `i` of a row falls in bin `i mod L` (strided bins, which meet the
    recall model of arXiv 2206.14286); the kept entries are the maxima of the
    `k` bins with the largest maxima.
    """
    n = x.shape[-1]
    bins = approx_bin_count(n, k, recall_target, rank=x.shape.rank)
    if bins >= n:
        return tf.math.top_k(x, k, sorted=True)
    groups = _ceil_div(n, bins)
    lead = tf.shape(x)[:-1]
    rows = tf.reshape(x, [-1, n])
    pad = groups * bins - n
    if pad:
        rows = tf.pad(rows, [[0, 0], [0, pad]], constant_values=rows.dtype.min)
    grid = tf.reshape(rows, [-1, groups, bins])
    bin_max = tf.reduce_max(grid, axis=1)
    bin_arg = tf.argmax(grid, axis=1, output_type=tf.int32)
    values, top_bins = tf.math.top_k(bin_max, k, sorted=True)
    group = tf.gather(bin_arg, top_bins, batch_dims=1)
    indices = group * bins + top_bins
    out_shape = tf.concat([lead, [k]], axis=0)
    return tf.reshape(values, out_shape), tf.reshape(indices, out_shape)


def indices_to_mask(indices, n, dtype):
    """A `[..., n]` tensor of `dtype`: 1 at `indices` (`[..., k]`), else 0."""
    k = indices.shape[-1]
    flat = tf.reshape(indices, [-1, k])
    num_rows = tf.shape(flat)[0]
    row_ids = tf.broadcast_to(tf.range(num_rows)[:, None], tf.shape(flat))
    coords = tf.stack([row_ids, flat], axis=-1)
    mask = tf.scatter_nd(
        tf.reshape(coords, [-1, 2]),
        tf.ones([num_rows * k], dtype=dtype),
        tf.stack([num_rows, n]),
    )
    return tf.reshape(mask, tf.concat([tf.shape(indices)[:-1], [n]], axis=0))


def statistical_cutoff(x, k):
    """Per-row cutoff above which about `k` of the `n` entries lie.

    `mean + std · Φ⁻¹(1 - k/n)` over the last axis: exact in expectation for
    Gaussian rows, which pre-activations of wide layers roughly are (Spark
    Transformer, arXiv 2506.06644). Linear time, no sort; moments in float32.
    A row whose entries are all equal (std 0) keeps none of them.

    The mean square is one row-wise dot product (`einsum`), so that outside
    XLA the moments read the row twice instead of three times and write
    nothing: 2048 x 3072 train step, four side-by-side runs, 1.05-1.07x
    dense with `E[(x - mean)²]`, 1.00-1.03x with `E[x²] - mean²`. Under XLA
    the two-pass form fuses and measured 0.96-1.15x against 1.00-1.08x
    (faster in 3 of 4 runs), so it is kept there. The one-pass variance
    loses about `eps · mean² / variance` of relative precision: nothing for
    pre-activations, whose mean is within a few standard deviations of 0.

    Returns:
      float32 `[..., 1]`, without gradient.
    """
    x = tf.stop_gradient(_check_operand(x, k))
    n = x.shape[-1]
    if k == n:
        return tf.fill(tf.concat([tf.shape(x)[:-1], [1]], 0), -math.inf)
    z = statistics.NormalDist().inv_cdf(1.0 - k / n)
    x = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(x, axis=-1, keepdims=True)
    if _compiled_by_xla():
        variance = tf.reduce_mean(tf.math.squared_difference(x, mean),
                                  axis=-1, keepdims=True)
    else:
        mean_square = tf.einsum("...i,...i->...", x, x)[..., None] / n
        variance = tf.maximum(mean_square - tf.square(mean), 0.0)
    return mean + z * tf.sqrt(variance)


def _compiled_by_xla():
    """Whether the graph being built will be compiled by XLA
    (`jit_compile=True`, TPU): the private test TensorFlow's own
    `tf.function` uses; False where it is missing."""
    try:
        from tensorflow.python.framework import ops as framework_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow without them
        return False
    return control_flow_util.GraphOrParentsInXlaContext(
        framework_ops.get_default_graph())


def _above_cutoff(x, k):
    """ReLU, then zero what is not above the statistical cutoff."""
    # Compared in float32: a bfloat16 cutoff would shift the kept count.
    cutoff = tf.maximum(statistical_cutoff(x, k), 0.0)
    return x * tf.cast(tf.cast(x, tf.float32) > cutoff, x.dtype)


def topk_mask(x, k, method="auto", recall_target=0.95):
    """ReLU, then keep per row the `k` largest activations and zero the rest.

    The Top-k nonlinearity of arXiv 2210.06313. A row with fewer than `k`
    positive entries keeps only those. Gradients flow to the kept entries
    only.

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
    >>> topk_mask(tf.constant([[3.0, -1.0, 2.0, 5.0]]), k=2).numpy()
    array([[3., 0., 0., 5.]], dtype=float32)
    """
    x = _check_operand(x, k)
    if resolve_method(method) == "statistical":
        return _above_cutoff(x, k)
    activations = tf.nn.relu(x)
    _, indices = topk_indices(activations, k, method, recall_target)
    return activations * indices_to_mask(indices, x.shape[-1], x.dtype)


def topk_activations(x, k, method="auto", recall_target=0.95):
    """The activations `topk_mask` keeps, as `(values, indices)`, `[..., k]`.

    The input of `sparse_mlp_product`. Values are differentiable. For
    `"statistical"`, the `k` largest of the entries above the cutoff, zeros
    where fewer pass it: equal to `topk_mask`'s when at most `k` pass.
    """
    x = _check_operand(x, k)
    if resolve_method(method) == "statistical":
        activations, method = _above_cutoff(x, k), "exact"
    else:
        activations = tf.nn.relu(x)
    _, indices = topk_indices(activations, k, method, recall_target)
    return tf.gather(activations, indices, batch_dims=-1), indices


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
    rows = tf.gather(kernel, indices)  # [..., k, d]
    return tf.squeeze(tf.matmul(values[..., None, :], rows), axis=-2)
