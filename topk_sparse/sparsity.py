"""Activation sparsity, the measure of *The Lazy Neuron Phenomenon*.

The paper (arXiv 2210.06313, Sec. 2) counts, per token, the share of an MLP's
hidden activations `relu(Kᵀx)` that are strictly positive, and averages over
tokens. `NonzeroFraction` accumulates that average over the calls since
its last reset, together with how often each hidden neuron fired (for dead
neuron counts) and how many tokens had each number of nonzero activations
(the per-token distribution). Each `TopKActivation` and `SparseMLP` owns
one, so Keras puts `<layer>/nonzero_fraction` into `model.fit` logs and
History, and callbacks read the layers' metrics instead of re-running the
model. Layers with an approximate method (`"approx"`, `"statistical"`) also
own a `TopKRecall`, `<layer>/topk_recall`.
"""

import contextlib

import keras
from keras import ops
import numpy as np


@keras.saving.register_keras_serializable(package="topk_sparse")
class NonzeroFraction(keras.metrics.Metric):
    """Running nonzero fraction of a layer's hidden activations.

    NaN tokens are skipped: a token whose activations hold a NaN (under
    `topk_sparse.ops`' NaN policy, a token whose input held one: its kept
    activations are NaN) counts neither as a token nor as firing any
    neuron, and is left out of the per-token distribution, so one NaN
    token does not drag the fraction down or mark neurons dead. The NaN
    itself surfaces in the layer's output and the loss. A token counts as
    NaN when its activations sum to NaN: for post-ReLU activations (all
    >= 0 or +inf), exactly when one of them is NaN.

    Args:
      mlp_dim: int. Size of the hidden dimension.
      name: str. Metric name (the key in `fit` logs).

    Example:
    >>> m = NonzeroFraction(mlp_dim=4)
    >>> m.update_state(np.array([[1.0, 0.0, 0.0, 2.0]], "float32"))
    >>> float(m.result())
    0.5
    """

    def __init__(self, mlp_dim, name="nonzero_fraction", **kwargs):
        super().__init__(name=name, **kwargs)
        self.mlp_dim = mlp_dim
        # Replicas' counts add up under a distribution strategy.
        self.nonzero_count = self.add_variable(
            shape=(), initializer="zeros", name="nonzero_count",
            aggregation="sum")
        self.token_count = self.add_variable(
            shape=(), initializer="zeros", name="token_count",
            aggregation="sum")
        self.neuron_fire_count = self.add_variable(
            shape=(mlp_dim,), initializer="zeros", name="neuron_fire_count",
            aggregation="sum")
        # [c]: tokens with exactly c nonzero activations, c in [0, mlp_dim].
        self.tokens_by_nonzero_count = self.add_variable(
            shape=(mlp_dim + 1,), initializer="zeros",
            name="tokens_by_nonzero_count", aggregation="sum")

    def update_state(self, activations):
        """Counts the positive entries of `activations` `[..., mlp_dim]`
        (post-ReLU), NaN tokens skipped."""
        activations = ops.reshape(activations, (-1, self.mlp_dim))
        valid = _tokens_without_nan(activations)
        fired = ops.logical_and(activations > 0, valid[:, None])
        self._accumulate(ops.sum(ops.cast(fired, self.dtype), axis=0),
                         ops.sum(ops.cast(fired, "int32"), axis=1), valid)

    def update_from_topk(self, values, indices):
        """Same as `update_state` from the kept `values`/`indices` `[..., k]`."""
        k = values.shape[-1]
        values = ops.reshape(values, (-1, k))
        valid = _tokens_without_nan(values)
        fired = ops.logical_and(values > 0, valid[:, None])
        per_neuron = ops.segment_sum(
            ops.reshape(ops.cast(fired, self.dtype), (-1,)),
            ops.reshape(indices, (-1,)), num_segments=self.mlp_dim)
        self._accumulate(per_neuron,
                         ops.sum(ops.cast(fired, "int32"), axis=1), valid)

    def _accumulate(self, per_neuron, per_token, valid):
        """`per_neuron`: fire counts `[mlp_dim]`; `per_token`: int32 nonzero
        counts `[tokens]`; `valid`: bool `[tokens]`, False for NaN tokens
        (which `per_neuron` and `per_token` already leave out). Counts are
        float32 sums: exact up to 2^24 tokens between resets."""
        valid = ops.cast(valid, self.dtype)
        self.neuron_fire_count.assign_add(per_neuron)
        self.nonzero_count.assign_add(ops.sum(per_neuron))
        self.token_count.assign_add(ops.sum(valid))
        self.tokens_by_nonzero_count.assign_add(ops.segment_sum(
            valid, per_token, num_segments=self.mlp_dim + 1))

    def result(self):
        return ops.divide_no_nan(self.nonzero_count,
                                 self.token_count * self.mlp_dim)

    def dead_fraction(self):
        """Share of neurons that never fired since the last reset."""
        return ops.mean(ops.cast(self.neuron_fire_count == 0, self.dtype))

    def token_nonzero_fractions(self):
        """`(fractions, tokens)`: the per-token nonzero fractions seen since
        the last reset, `c / mlp_dim` for every count `c` that occurred, and
        how many tokens had each (numpy, summed over replicas)."""
        histogram = np.asarray(self.tokens_by_nonzero_count.numpy())
        nonzero_counts = np.flatnonzero(histogram)
        return nonzero_counts / self.mlp_dim, histogram[nonzero_counts]

    def get_config(self):
        return {**super().get_config(), "mlp_dim": self.mlp_dim}


@keras.saving.register_keras_serializable(package="topk_sparse")
class TopKRecall(keras.metrics.Metric):
    """Share of the exact top-k activations that an approximate method kept.

    The recall of `"approx"` (TPU-KNN's binned top-k) and `"statistical"`,
    measured on the model's own activations while it trains: the recall
    target of `"approx"` holds in expectation over bin assignments, and a
    given layer can fall short of it (hot neurons sharing a bin). Positive
    entries of the exact top-k count; ties go to the lower index, as in
    `top_k`. Only the first `sample_tokens` tokens of each call are
    checked, so the exact top-k it computes costs little. Tokens whose
    pre-activations hold a NaN are skipped (no relevant entries), as in
    `NonzeroFraction`.

    Args:
      k: int. Activations kept per token.
      sample_tokens: int. Tokens checked per call. Defaults to 64.
      name: str. Metric name (the key in `fit` logs).
    """

    def __init__(self, k, sample_tokens=64, name="topk_recall", **kwargs):
        super().__init__(name=name, **kwargs)
        self.k = k
        self.sample_tokens = sample_tokens
        self.hits = self.add_variable(shape=(), initializer="zeros",
                                      name="hits", aggregation="sum")
        self.relevant = self.add_variable(shape=(), initializer="zeros",
                                          name="relevant", aggregation="sum")

    def update_state(self, pre_activations, kept):
        """`pre_activations`: `[..., n]`, before ReLU; `kept`: `[..., n]`,
        nonzero where the approximate method kept the entry."""
        values, indices, valid = self._exact_topk(pre_activations)
        self._accumulate(values, ops.take_along_axis(
            self._sample(kept), indices, axis=-1) != 0, valid)

    def update_from_topk(self, pre_activations, kept_values, kept_indices):
        """Same as `update_state` from the kept `values`/`indices` `[..., k]`
        (the gathered path): no `[tokens, n]` mask is built."""
        values, indices, valid = self._exact_topk(pre_activations)
        kept_values = self._sample(kept_values)
        kept_indices = self._sample(kept_indices)
        found = ops.logical_and(
            indices[:, :, None] == kept_indices[:, None, :],
            kept_values[:, None, :] > 0)
        self._accumulate(values, ops.any(found, axis=-1), valid)

    def _sample(self, x):
        """The first `sample_tokens` tokens of `x` `[..., m]`, as rows."""
        return ops.reshape(x, (-1, x.shape[-1]))[:self.sample_tokens]

    def _exact_topk(self, pre_activations):
        """`(values, indices, valid)` of the sampled tokens: their exact
        top-k after ReLU, and False for the tokens that hold a NaN."""
        activations = ops.relu(self._sample(pre_activations))
        values, indices = ops.top_k(activations, self.k)
        return values, indices, _tokens_without_nan(activations)

    def _accumulate(self, exact_values, kept, valid):
        """`exact_values`: the exact top-k `[rows, k]`; `kept`: whether the
        method kept each of them; `valid`: `[rows]`, False for NaN tokens."""
        relevant = ops.logical_and(exact_values > 0, valid[:, None])
        hit = ops.logical_and(relevant, kept)
        self.hits.assign_add(ops.sum(ops.cast(hit, self.dtype)))
        self.relevant.assign_add(ops.sum(ops.cast(relevant, self.dtype)))

    def result(self):
        return ops.divide_no_nan(self.hits, self.relevant)

    def get_config(self):
        return {**super().get_config(), "k": self.k,
                "sample_tokens": self.sample_tokens}


def _tokens_without_nan(activations):
    """`[tokens]` bool: False for the rows of post-ReLU `activations`
    `[tokens, m]` that hold a NaN. One row sum: entries >= 0 or +inf sum to
    NaN exactly when one is NaN."""
    return ops.logical_not(ops.isnan(ops.sum(activations, axis=1)))


@contextlib.contextmanager
def metrics_restored(model):
    """Restores all of `model.metrics_variables` on exit.

    Every call of the model updates its layers' sparsity metrics: passes
    that are not evaluation (corrupted inputs, recording calibration
    inputs) run inside this, so that `fit` logs, callbacks and reports
    see only what `fit` / `evaluate` measured.
    """
    saved = [v.numpy() for v in model.metrics_variables]
    try:
        yield
    finally:
        for variable, value in zip(model.metrics_variables, saved):
            variable.assign(value)
