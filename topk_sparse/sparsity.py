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

A layer's metrics keep their counts in the layer, as non-trainable layer
state (`owner=layer`) but not as weights (`MeasuredLayer`): a call updates
layer state, which every backend carries through a compiled step (on JAX,
Keras passes a model's non-trainable variables in and out of
`stateless_call`, but not its metrics' variables: keras-team/keras#21639).
So the counts are right on both backends in `fit`, `evaluate`, `predict`,
`generate` and any stateless loop; only inside JAX's compiled train and
test steps, where the layer state is not passed to the metrics, does
`result()` read NaN (the per-batch progress bar); the epoch's logs and
History are read after the step, exactly.
The counts are not the model's parameters, so `weights`, weight lists,
weights files and dtype policies leave them out: a dense model's weights
load into a Top-k model of any method, and back.
"""

import contextlib

import keras
from keras import ops
import numpy as np

from topk_sparse import backend


class _Counts(keras.metrics.Metric):
    """A metric of float32 counts, summed over replicas: `counters` maps
    each count's attribute name to its shape. Kept in the metric, or with
    `owner` in that layer as non-trainable weights (see the module
    docstring)."""

    def __init__(self, counters, owner=None, **kwargs):
        super().__init__(**kwargs)
        self._in_layer = owner is not None
        self.counters = [self._counter(name, shape, owner)
                         for name, shape in counters.items()]
        for name, counter in zip(counters, self.counters):
            setattr(self, name, counter)

    def _counter(self, name, shape, owner):
        if owner is None:
            return self.add_variable(shape=shape, initializer="zeros",
                                     name=name, aggregation="sum")
        # As a metric's variable: summed over replicas when read, each
        # replica counting into its own copy (`assign_add` on a layer
        # weight's default synchronization sums the replicas' new values
        # instead: counts double with two replicas).
        with keras.name_scope(owner.name, caller=owner):
            counter = keras.Variable(
                initializer="zeros", shape=shape, dtype=self.dtype,
                trainable=False, autocast=False, aggregation="sum",
                synchronization="on_read",
                name=f"{self.name.rpartition('/')[2]}_{name}")
        owner._track_variable(counter)  # what Layer.add_weight does
        return counter

    @property
    def variables(self):
        """The metric's own variables: none when its layer keeps the
        counts (Keras would otherwise pass them to the step twice)."""
        return [] if self._in_layer else super().variables

    def result(self):
        """`_ratio()` of the counts; NaN where they cannot be read (inside
        JAX's compiled `fit` steps, see the module docstring)."""
        if not all(backend.has_value(v) for v in self.counters):
            return ops.convert_to_tensor(np.nan, self.dtype)
        return self._ratio()

    def reset_state(self):
        for counter in self.counters:
            counter.assign(ops.zeros(counter.shape, counter.dtype))


@keras.saving.register_keras_serializable(package="topk_sparse")
class NonzeroFraction(_Counts):
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
      owner: None, or the layer that keeps the counts (see the module
        docstring).

    Example:
    >>> m = NonzeroFraction(mlp_dim=4)
    >>> m.update_state(np.array([[1.0, 0.0, 0.0, 2.0]], "float32"))
    >>> float(m.result())
    0.5
    """

    def __init__(self, mlp_dim, name="nonzero_fraction", owner=None,
                 **kwargs):
        # tokens_by_nonzero_count[c]: tokens with exactly c nonzero
        # activations, c in [0, mlp_dim].
        super().__init__(
            {"nonzero_count": (), "token_count": (),
             "neuron_fire_count": (mlp_dim,),
             "tokens_by_nonzero_count": (mlp_dim + 1,)},
            name=name, owner=owner, **kwargs)
        self.mlp_dim = mlp_dim

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

    def _ratio(self):
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
class TopKRecall(_Counts):
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
      owner: None, or the layer that keeps the counts.
    """

    def __init__(self, k, sample_tokens=64, name="topk_recall", owner=None,
                 **kwargs):
        super().__init__({"hits": (), "relevant": ()}, name=name,
                         owner=owner, **kwargs)
        self.k = k
        self.sample_tokens = sample_tokens

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

    def _ratio(self):
        return ops.divide_no_nan(self.hits, self.relevant)

    def get_config(self):
        return {**super().get_config(), "k": self.k,
                "sample_tokens": self.sample_tokens}


def _tokens_without_nan(activations):
    """`[tokens]` bool: False for the rows of post-ReLU `activations`
    `[tokens, m]` that hold a NaN. One row sum: entries >= 0 or +inf sum to
    NaN exactly when one is NaN."""
    return ops.logical_not(ops.isnan(ops.sum(activations, axis=1)))


class MeasuredLayer(keras.layers.Layer):
    """Base of the layers whose sparsity metrics keep their counts in them
    (`owner=self`, see the module docstring).

    The counts are layer state (`variables`, `non_trainable_variables`:
    carried through JAX's stateless steps) but not weights: `weights`,
    `get_weights` / `set_weights`, `save_weights` / `load_weights` and
    `.keras` files hold the parameters only, so they move between a dense
    layer and a Top-k one of any method, and a `"bfloat16"` policy sees no
    float32 count among its weights. Files written while the counts were
    weights (before 2026-12) hold them after the parameters: they load.
    """

    def _counts(self):
        return {id(counter) for metric in self._metrics
                if isinstance(metric, _Counts) for counter in metric.counters}

    def _parameters(self):
        counts = self._counts()
        return [v for v in self._trainable_variables +
                self._non_trainable_variables if id(v) not in counts]

    @property
    def weights(self):
        counts = self._counts()
        return [w for w in super().weights if id(w) not in counts]

    def save_own_variables(self, store):
        for i, variable in enumerate(self._parameters()):
            store[f"{i}"] = variable

    def load_own_variables(self, store):
        parameters = self._parameters()
        if len(store.keys()) < len(parameters):
            raise ValueError(
                f"Layer {self.name!r} has {len(parameters)} weights "
                f"({[v.name for v in parameters]}), but the file holds "
                f"{len(store.keys())} for it: load a file of a model of the "
                f"same architecture.")
        for i, variable in enumerate(parameters):
            variable.assign(store[f"{i}"])


NONZERO_SUFFIX = "/nonzero_fraction"
"""A layer's `NonzeroFraction` is `<MLP name>/nonzero_fraction`, its key in
`fit` logs."""


def sparse_mlps(model):
    """The model's Top-k MLPs by name, in layer order: the one answer to
    "which MLPs does this model have" (the trainer's report, the callbacks,
    `topk_sparse.allocation`).

    `model.sparse_mlps()` where the model names them (`ViT`, `T5`, keras-hub
    backbones from `integrations.keras_hub.sparsify`); else every
    `SparseMLP` and `TopKActivation` of the model (yours), named by its
    metric, `<name>/nonzero_fraction` (its layer name unless its
    `metric_name` says otherwise).

    Raises:
      ValueError: two of the model's MLPs share a name.
    """
    if hasattr(model, "sparse_mlps"):
        return model.sparse_mlps()
    found = {}
    for layer in model._flatten_layers(include_self=False):
        if not isinstance(layer, MeasuredLayer):
            continue
        metric = layer.nonzero_fraction
        name = layer.name if metric is None else \
            metric.name.removesuffix(NONZERO_SUFFIX)
        if name in found:
            raise ValueError(
                f"Two layers of model {model.name!r} are both named "
                f"{name!r}: give them distinct names.")
        found[name] = layer
    return found


def metric_state(layer):
    """Every variable of the metrics of `layer` (a model or a layer) and
    its sublayers: their own variables and the counts that layers keep for
    their sparsity metrics."""
    variables = [*layer.metrics_variables,
                 *(v for m in layer.metrics if isinstance(m, _Counts)
                   for v in m.counters)]
    return list({id(v): v for v in variables}.values())


@contextlib.contextmanager
def metrics_restored(model):
    """Restores all of `metric_state(model)` on exit.

    Every call of the model updates its layers' sparsity metrics: passes
    that are not evaluation (corrupted inputs, recording calibration
    inputs) run inside this, so that `fit` logs, callbacks and reports
    see only what `fit` / `evaluate` measured.
    """
    variables = metric_state(model)
    saved = [v.numpy() for v in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
