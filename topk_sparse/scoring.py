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
"""

import numpy as np
import tensorflow as tf

from topk_sparse import ops
from topk_sparse.sparsity import TopKRecall, metrics_restored


def low_rank_factors(kernel, inputs, rank):
    """`(factor [d, rank], basis [rank, n])`, float32, such that
    `inputs @ factor @ basis` is the best rank-`rank` approximation of
    `inputs @ kernel` in mean square over the rows of `inputs`.

    With the input second moment `C = inputsᵀ inputs / N`, the right
    singular vectors `Q` of `C^½ · kernel` span the best rank-`rank` score
    subspace; `factor = kernel Q` and `basis = Qᵀ`. Computed in float64.

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
    eigenvalues, eigenvectors = np.linalg.eigh(inputs.T @ inputs / len(inputs))
    root = eigenvectors * np.sqrt(np.maximum(eigenvalues, 0.0))
    _, _, basis = np.linalg.svd(root.T @ kernel, full_matrices=False)
    basis = basis[:rank]
    return ((kernel @ basis.T).astype(np.float32), basis.astype(np.float32))


def validate_rank(rank, d, n):
    """Returns `rank` if it is an int in `[1, min(d, n)]` (a `[d, n]`
    kernel's), else raises."""
    if isinstance(rank, bool) or not isinstance(rank, int) or \
            not 0 < rank <= min(d, n):
        raise ValueError(
            f"rank must be an int in [1, {min(d, n)}] (min of the kernel's "
            f"{d} x {n}), got {rank!r}.")
    return rank


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
    scores = tf.matmul(tf.matmul(x, factor), basis)
    if bias is not None:
        scores = scores + bias
    _, chosen = tf.math.top_k(tf.stop_gradient(scores), candidates)
    rows = tf.gather(kernel_rows, chosen)  # [tokens, candidates, d]
    exact = tf.squeeze(tf.matmul(rows, x[..., None]), -1)
    if bias is not None:
        exact = exact + tf.gather(bias, chosen)
    _, best = tf.math.top_k(tf.stop_gradient(exact), k)
    values = tf.gather(exact, best, batch_dims=1)
    return tf.nn.relu(values), tf.gather(chosen, best, batch_dims=1)


class TwoStageScorer(tf.Module):
    """Inference-time state of a `SparseMLP`'s two-stage scoring: the
    factors and a frozen copy of `W1ᵀ`. Made by
    `SparseMLP.calibrate_scoring`; not part of the layer's Keras weights (it
    is rebuilt from the inputs, in seconds, after loading a model)."""

    def __init__(self, kernel, inputs, rank, candidates, dtype="float32"):
        super().__init__(name="two_stage_scorer")
        factor, basis = low_rank_factors(kernel, inputs, rank)
        self.rank, self.candidates = rank, candidates

        def frozen(value, name):
            return tf.Variable(tf.cast(value, dtype), trainable=False,
                               name=name)

        self.factor = frozen(factor, "factor")
        self.basis = frozen(basis, "basis")
        self.kernel_rows = frozen(np.asarray(kernel, np.float32).T,
                                  "kernel_rows")

    def topk(self, x, k, bias=None):
        """`two_stage_topk` of `x` `[tokens, d]` with this scorer's state."""
        return two_stage_topk(x, k, self.candidates, self.factor, self.basis,
                              self.kernel_rows, bias)


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
    if scorer is None:
        raise ValueError(f"SparseMLP {mlp.name!r} has no scorer: call "
                         "calibrate_scoring first.")
    tokens = tf.reshape(tf.cast(inputs, mlp.compute_dtype),
                        [-1, scorer.kernel_rows.shape[-1]])
    output_kernel = tf.cast(mlp.output_kernel, tokens.dtype)
    bias = mlp.intermediate_bias
    bias = None if bias is None else tf.cast(bias, tokens.dtype)

    def output(values, indices):
        return tf.math.l2_normalize(
            ops.sparse_mlp_product(values, indices, output_kernel), -1)

    recall = TopKRecall(mlp.k, sample_tokens=chunk)
    cosines = []
    for start in range(0, tokens.shape[0], chunk):
        x = tokens[start:start + chunk]
        hidden = mlp.pre_activations(x)
        exact = ops.topk_activations(hidden, mlp.k, "exact")
        two_stage = scorer.topk(x, mlp.k, bias)
        recall.update_from_topk(hidden, *two_stage)
        cosines.append(tf.reduce_sum(output(*exact) * output(*two_stage),
                                     -1).numpy())
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
      rank, candidates: see `SparseMLP.calibrate_scoring`.
      held_out: iterable of model inputs to measure on; None measures on
        `batches` (in-sample: optimistic).

    The model's metrics (its layers' sparsity) are left as they were.

    Returns:
      `{mlp path: {"recall", "cosine"}}`, see `measure_two_stage`.
    """
    from topk_sparse.layers import recording_inputs  # layers imports us

    mlps = model.sparse_mlps()

    def record(inputs):
        with metrics_restored(model), recording_inputs(mlps) as records:
            for batch in inputs:
                model(batch, training=False)
        return {name: tf.concat(parts, 0) for name, parts in records.items()}

    calibration = record(batches)
    measured = calibration if held_out is None else record(held_out)
    for name, mlp in mlps.items():
        mlp.calibrate_scoring(calibration[name], rank, candidates)
    return {name: measure_two_stage(mlp, measured[name])
            for name, mlp in mlps.items()}
