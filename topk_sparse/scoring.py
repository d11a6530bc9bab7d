"""Two-stage neuron scoring: choose the `k` neurons without reading all of W1.

At batch 1 the gathered MLP path (`SparseMLP(implementation="gather")`)
still reads the whole first kernel `W1` (`[d, n]`) to score the `n` neurons,
half of the dense MLP's memory traffic. Two-stage scoring, the
score-then-rescore of maximum-inner-product search (as in ScaNN), reads
less:

1. score every neuron with a rank-`r` factorization `x · F · B ≈ x · W1`
   (`F`: `[d, r]`, `B`: `[r, n]`): `r (d + n)` weights instead of `d n`;
2. take the `candidates` best, rescore them exactly from the transposed
   kernel (`candidates` contiguous rows of `W1ᵀ`), keep the `k` best.

The factorization is fitted to the layer's own inputs (`low_rank_factors`):
the best rank-`r` approximation of the scores in mean square over
calibration tokens, which is much better than a factorization of `W1` alone
when the inputs, as in trained Transformers, fill few directions. Its
quality is measured, never assumed: `measure_two_stage` gives the recall of
the exact top-k and the cosine of the MLP output to the exact path.

Everything about it lives here; the layer only has a slot: a
`SparseMLP.scorer` sees each call first and may return the kept neurons.

- `check(mlp, rank, candidates)`: raises unless the MLP can be calibrated
  so (a trainer checks its config with it before training);
- `calibrate_mlp(mlp, inputs, rank, candidates)`: fits a `TwoStageScorer`
  to the MLP's inputs and puts it in the slot (`mlp.scorer = None` removes
  it);
- `recording_inputs(mlps)`: records what the MLPs are called with;
- `calibrate(model, batches, ...)`: all of the above for every MLP of a
  model, and `measure_two_stage` on held-out inputs.
"""

import contextlib

import keras
from keras import ops
import numpy as np

from topk_sparse import backend, checks
from topk_sparse import ops as topk_ops
from topk_sparse.sparsity import TopKRecall, metrics_restored


def low_rank_factors(kernel, inputs, rank):
    """`(factor [d, rank], basis [rank, n])`, float32, such that
    `inputs @ factor @ basis` is the best rank-`rank` approximation of
    `inputs @ kernel` in mean square over the rows of `inputs`.

    With the input second moment `C = inputsᵀ inputs / N`, the right
    singular vectors `Q` of `C^½ · kernel` span the best rank-`rank` score
    subspace; `factor = kernel Q` and `basis = Qᵀ`. Computed in float64
    (float32 on JAX without x64).

    Args:
      kernel: `[d, n]` array, the first MLP kernel.
      inputs: `[..., d]` array of calibration inputs (tokens).
      rank: int, `0 < rank <= min(d, n)`.
    """
    kernel = np.asarray(kernel, np.float64)
    d, n = kernel.shape
    validate_rank(rank, d, n)
    inputs = np.asarray(inputs, np.float64).reshape(-1, d)
    if len(inputs) < rank:
        raise ValueError(
            f"{len(inputs)} calibration tokens cannot fit a rank-{rank} "
            f"scorer: pass at least {rank} (thousands give a stable fit).")
    # The backend's solvers, not numpy's: beside TensorFlow's thread pool,
    # numpy's multi-threaded BLAS was seen here to take 3-7 s instead of
    # 0.3 s for one 512 x 2048 kernel (2 cores).
    eigenvalues, eigenvectors = ops.eigh(inputs.T @ inputs / len(inputs))
    root = eigenvectors * ops.sqrt(ops.maximum(eigenvalues, 0.0))
    _, _, right = ops.svd(
        ops.matmul(ops.transpose(root), ops.cast(kernel, root.dtype)),
        full_matrices=False)
    basis = np.asarray(ops.convert_to_numpy(right[:rank]), np.float64)
    return ((kernel @ basis.T).astype(np.float32), basis.astype(np.float32))


def validate_rank(rank, d, n):
    """Returns `rank` if it is an int in `[1, min(d, n)]` (a `[d, n]`
    kernel's), else raises."""
    return checks.int_in_range(rank, "rank", 1, min(d, n),
                               f" (min of the kernel's {d} x {n})")


def two_stage_topk(x, k, candidates, factor, basis, kernel_rows, bias=None):
    """The `k` largest of `relu(x @ W1 + bias)` per token, chosen among the
    `candidates` best low-rank scores and rescored exactly.

    Args:
      x: float `[tokens, d]`.
      k: int, kept per token, `k <= candidates`.
      candidates: int, rescored per token, `candidates <= n`.
      factor, basis: the `low_rank_factors` of `W1`.
      kernel_rows: `W1ᵀ`, `[n, d]` (rows gathered contiguously).
      bias: `[n]` or None.

    Returns:
      `(values, indices)`, `[tokens, k]`: values after ReLU (differentiable
      with respect to `x` and `kernel_rows`), indices int32 into `n`.
    """
    scores = ops.matmul(ops.matmul(x, factor), basis)
    if bias is not None:
        scores = scores + bias
    _, chosen = ops.top_k(ops.stop_gradient(scores), candidates)
    rows = ops.take(kernel_rows, chosen, axis=0)  # [tokens, candidates, d]
    exact = ops.squeeze(ops.matmul(rows, x[..., None]), -1)
    if bias is not None:
        exact = exact + ops.take(bias, chosen, axis=0)
    _, best = ops.top_k(ops.stop_gradient(exact), k)
    values = ops.take_along_axis(exact, best, axis=1)
    return (ops.relu(values),
            ops.cast(ops.take_along_axis(chosen, best, axis=1), "int32"))


class TwoStageScorer:
    """Inference-time state of a `SparseMLP`'s two-stage scoring: the
    factors and a frozen copy of `W1ᵀ`. Made by `calibrate_mlp`; not part
    of the layer's Keras weights (it is rebuilt from the inputs, in
    seconds, after loading a model)."""

    def __init__(self, kernel, inputs, rank, candidates, dtype="float32"):
        factor, basis = low_rank_factors(kernel, inputs, rank)
        self.rank, self.candidates = rank, candidates

        def frozen(value, name):
            return keras.Variable(value, dtype=dtype, trainable=False,
                                  name=name)

        self.factor = frozen(factor, "factor")
        self.basis = frozen(basis, "basis")
        self.kernel_rows = frozen(np.asarray(kernel, np.float32).T,
                                  "kernel_rows")

    def topk(self, x, k, bias=None):
        """`two_stage_topk` of `x` `[tokens, d]` with this scorer's state."""
        return two_stage_topk(x, k, self.candidates, self.factor, self.basis,
                              self.kernel_rows, bias)

    def __call__(self, mlp, inputs, training=None):
        """The slot's contract (`SparseMLP.scorer`): the kept `(values,
        indices)` `[..., k]` of a gathered call that reads few enough rows
        of `W1ᵀ`, else None (the layer's own paths run)."""
        if training:
            raise ValueError(
                f"SparseMLP {mlp.name!r} has a two-stage scorer, whose frozen "
                f"copy of W1 training would make stale: set mlp.scorer = "
                f"None before training, calibrate again after.")
        if not (mlp.gathers(inputs) and
                mlp.reads_few_rows(inputs, self.candidates)):
            return None
        flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
        # No recall metric here: it would read all of W1 (measure_two_stage
        # measures it apart).
        values, indices = self.topk(flat, mlp.k, mlp.intermediate_bias)
        shape = (*ops.shape(inputs)[:-1], mlp.k)
        return ops.reshape(values, shape), ops.reshape(indices, shape)


class _Recorder:
    """Slot object of `recording_inputs`: records, never chooses."""

    def __init__(self, append):
        self.append = append

    def __call__(self, mlp, inputs, training=None):
        flat = backend.static_value(inputs)
        if flat is None:
            raise RuntimeError(
                f"recording_inputs needs eager calls (model(x)), but "
                f"{type(mlp).__name__} {mlp.name!r} is being traced "
                f"(predict, tf.function, jax.jit).")
        self.append(flat.reshape(-1, inputs.shape[-1]))
        return None


@contextlib.contextmanager
def recording_inputs(mlps):
    """Records what the given `SparseMLP`s (or `TopKActivation`s) are
    called with, eagerly.

    Their scorers, if any, are set aside meanwhile (the calls take the
    layers' own paths) and put back on exit.

    Args:
      mlps: `{name: SparseMLP or TopKActivation}`, e.g.
        `model.sparse_mlps()`.

    Yields:
      `{name: [inputs [tokens, d], ...]}`, one entry per eager call made
      inside the context; a traced call (`predict`, `tf.function`) raises.

    Example:
    >>> model = topk_sparse.models.ViT("micro", image_size=16,
    ...                                num_classes=10, k=8)
    >>> with recording_inputs(model.sparse_mlps()) as records:
    ...     _ = model(np.zeros((2, 16, 16, 3), "float32"))
    >>> tuple(records["encoder_block_0_mlp"][0].shape)
    (34, 32)
    """
    records = {name: [] for name in mlps}
    saved = {name: mlp.scorer for name, mlp in mlps.items()}
    for name, mlp in mlps.items():
        mlp.scorer = _Recorder(records[name].append)
    try:
        yield records
    finally:
        for name, mlp in mlps.items():
            mlp.scorer = saved[name]


def check(mlp, rank, candidates=None):
    """Raises unless `calibrate_mlp(mlp, inputs, rank, candidates)` can run
    (before any inputs exist: a trainer checks its config with it);
    returns `candidates`, its default (`4 k`, at most `mlp_dim`) resolved.
    """
    if mlp.k is None or not mlp.built:
        raise ValueError(
            f"SparseMLP {mlp.name!r}: two-stage scoring needs a built "
            f"layer with k set, got built={mlp.built}, k={mlp.k}.")
    validate_rank(rank, *mlp.intermediate_kernel.shape)
    if candidates is None:
        return min(4 * mlp.k, mlp.mlp_dim)
    return checks.int_in_range(candidates, "candidates", mlp.k, mlp.mlp_dim)


def calibrate_mlp(mlp, inputs, rank, candidates=None):
    """Makes `mlp` score neurons in two stages on its gathered path.

    Fits a rank-`rank` scorer of `W1` to `inputs` (the layer's inputs,
    `[..., d]`, e.g. from `recording_inputs`) and freezes a copy of `W1ᵀ`
    to rescore `candidates` neurons per token exactly. Used for calls where
    tokens x `candidates` is at most `topk_sparse.ops.GATHER_MAX_SHARE` of
    `mlp_dim`; a training call raises (the frozen copy would go stale: set
    `mlp.scorer = None` first). Not saved with the model: calibrate again
    after loading (seconds). Measure what it costs in recall with
    `measure_two_stage` on held-out tokens: a low rank serves inputs that
    fill few directions only (benchmarks/recall.py).

    Args:
      mlp: a built `SparseMLP` with `k` set.
      inputs: calibration tokens `[..., d]`, thousands.
      rank: int. Rank of the first-stage scorer.
      candidates: int, `k <= candidates <= mlp_dim`, rescored per token.
        Defaults to `4 * k` (at most `mlp_dim`).
    """
    candidates = check(mlp, rank, candidates)
    mlp.scorer = TwoStageScorer(mlp.intermediate_kernel.numpy(), inputs,
                                rank, candidates, dtype=mlp.compute_dtype)


def measure_two_stage(mlp, inputs, chunk=256):
    """Recall of the exact top-k and mean cosine of the outputs, two-stage
    against exact scoring, of a calibrated `SparseMLP` on `inputs`
    (`[..., d]`; use tokens it was not calibrated on), `chunk` tokens at a
    time.

    Returns:
      dict with `recall` (share of the exact top-k's positive entries
      kept) and `cosine` (mean over tokens of the output's cosine
      similarity to the exact gathered path's, output bias left out).
    """
    scorer = mlp.scorer
    if not isinstance(scorer, TwoStageScorer):
        raise ValueError(f"SparseMLP {mlp.name!r} has no two-stage scorer: "
                         f"call calibrate_mlp first.")
    tokens = ops.reshape(ops.cast(inputs, mlp.compute_dtype),
                          (-1, scorer.kernel_rows.shape[-1]))
    output_kernel = ops.cast(mlp.output_kernel, tokens.dtype)
    bias = mlp.intermediate_bias
    bias = None if bias is None else ops.cast(bias, tokens.dtype)

    def output(values, indices):
        return ops.normalize(
            topk_ops.sparse_mlp_product(values, indices, output_kernel), -1)

    recall = TopKRecall(mlp.k, sample_tokens=chunk)
    cosines = []
    for start in range(0, tokens.shape[0], chunk):
        x = tokens[start:start + chunk]
        hidden = mlp.pre_activations(x)
        exact = topk_ops.topk_activations(hidden, mlp.k, "exact")
        two_stage = scorer.topk(x, mlp.k, bias)
        recall.update_from_topk(hidden, *two_stage)
        cosines.append(ops.convert_to_numpy(ops.sum(
            output(*exact) * output(*two_stage), -1)))
    return {"recall": float(recall.result()),
            "cosine": float(np.mean(np.concatenate(cosines)))}


def calibrate(model, batches, rank, candidates=None, held_out=None):
    """Calibrates two-stage scoring in every `SparseMLP` of `model`.

    Args:
      model: a model with `sparse_mlps()` (`topk_sparse.models.ViT`, `T5`),
        built with `k` set.
      batches: iterable of model inputs (e.g. a dataset's first few
        batches), run eagerly, in inference mode, to record each MLP's
        inputs.
      rank, candidates: see `calibrate_mlp`.
      held_out: iterable of model inputs to measure on; None measures on
        `batches` (in-sample: optimistic).

    The model's metrics (its layers' sparsity) are left as they were.

    Returns:
      `{mlp path: {"recall", "cosine", "candidates", "max_tokens"}}`: see
      `measure_two_stage`, each MLP's candidates (the default is its own
      `4 k`) and `max_tokens` (0: the scorer never runs at these
      `candidates`, whatever it measures).
    """
    mlps = model.sparse_mlps()

    def record(inputs):
        with metrics_restored(model), recording_inputs(mlps) as records:
            for batch in inputs:
                model(batch, training=False)
        return {name: np.concatenate(parts) for name, parts in
                records.items()}

    calibration = record(batches)
    measured = calibration if held_out is None else record(held_out)
    for name, mlp in mlps.items():
        calibrate_mlp(mlp, calibration[name], rank, candidates)
    return {name: {**measure_two_stage(mlp, measured[name]),
                   "candidates": mlp.scorer.candidates,
                   "max_tokens": max_tokens(mlp)}
            for name, mlp in mlps.items()}


def max_tokens(mlp):
    """The most tokens a call of `mlp` may have for its two-stage scorer to
    run (`SparseMLP.max_tokens` of the scorer's candidates): at most
    `topk_sparse.ops.GATHER_MAX_SHARE` of `mlp_dim` rows of `W1ᵀ` are rescored per call. 0
    means never, e.g. with candidates above a sixth of `mlp_dim`: lower
    them for the scorer to serve decoding (1 token per sequence)."""
    return mlp.max_tokens(mlp.scorer.candidates)
