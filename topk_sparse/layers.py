"""Keras 3 layers for Top-k sparse Transformer MLPs.

- `TopKActivation`: ReLU then keep the `k` largest activations per token.
- `SparseMLP`: the Transformer MLP block `V · TopK_k(relu(Kᵀx + b))`, with a
  masked path (dense matmuls, for training) and a gathered path (the second
  projection reads only the `k` kept rows, for inference); `k=None` is the
  plain ReLU MLP, the paper's dense baseline.

Both own an `NonzeroFraction` metric, `layer.nonzero_fraction`, which Keras
reports in `fit` logs as `<layer name>/nonzero_fraction`.
"""

import math

import keras
from keras import ops

from topk_sparse import checks
from topk_sparse import ops as topk_ops
from topk_sparse.sparsity import MeasuredLayer, NonzeroFraction, TopKRecall


def _sparsity_metric(layer, mlp_dim, name=None):
    if not layer.track_sparsity:
        return None
    return NonzeroFraction(mlp_dim, owner=layer,
                           name=name or f"{layer.name}/nonzero_fraction")


def _recall_metric(layer):
    """A `TopKRecall` where the method that runs here is approximate."""
    if not layer.track_sparsity or layer.k is None or \
            not topk_ops.resolve_method(layer.method).approximate:
        return None
    return TopKRecall(layer.k, name=f"{layer.name}/topk_recall",
                      owner=layer)


def _tokens(inputs):
    """The static token count of `inputs` `[..., features]`; None when a
    leading size is unknown."""
    lead = tuple(inputs.shape[:-1])
    return None if None in lead else math.prod(lead)


def _check_floating(x, layer):
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype not in topk_ops.FLOAT_DTYPES:
        raise TypeError(
            f"{layer.__class__.__name__} {layer.name!r} needs floating-point "
            f"inputs, got dtype {dtype}: cast them to float32.")


def _activation_function(name):
    """The function of an `activation` name (None: identity)."""
    if name is None:
        return None
    if name == "gelu_approximate":  # Gemma 3n's name
        return lambda x: keras.activations.gelu(x, approximate=True)
    return keras.activations.get(name)


@keras.saving.register_keras_serializable(package="topk_sparse")
class TopKActivation(MeasuredLayer):
    """ReLU, then keep per token the `k` largest activations.

    The Top-k nonlinearity of *The Lazy Neuron Phenomenon*: the rest of the
    last axis is zeroed and gets no gradient. A token with fewer than `k`
    positive activations keeps only those. Ties go to the lower index, as in
    `top_k`. (`method="statistical"` keeps instead the activations
    above a per-token cutoff: about `k`.) A model whose MLP has another
    activation (gelu) keeps it: `activation` runs on the kept entries (a
    dropped entry stays 0: relu and gelu map 0 to 0), as
    `integrations.keras_hub` puts it in keras-hub's MLPs.

    Args:
      k: int or None. Number of activations kept per token. Must not
        exceed the size of the last input dimension. None keeps every
        positive activation: a plain ReLU that still measures its sparsity
        (the dense baseline, as `SparseMLP(k=None)`).
      method: str. `"auto"` (default: `"approx"` on TPU, `"exact"`
        elsewhere), `"exact"` (`keras.ops.top_k`), `"approx"` (TPU-KNN's
        binned top-k: `approx_max_k` on TPU) or `"statistical"`
        (keep what exceeds the row's `mean + std · Φ⁻¹(1 - k/n)`: about `k`
        entries, no sort; see `topk_sparse.ops.statistical_cutoff`).
      recall_target: float in (0, 1]. Expected recall of `"approx"`.
        Defaults to 0.95.
      track_sparsity: bool. Whether the layer keeps an `NonzeroFraction`
        metric of its outputs (`layer.nonzero_fraction`) and, when its method
        is approximate here, a `TopKRecall` (`layer.recall`). Defaults to
        True.
      activation: str or None. The activation of the outputs: `"relu"`
        (default, the paper's), another Keras activation name or
        `"gelu_approximate"` (tanh-approximated gelu), applied after Top-k
        (with `k=None`, alone); None is the identity (with `k=None`, the
        layer only measures its inputs).
      metric_name: str or None. Name of the nonzero-fraction metric (the
        key in `fit` logs); None is `"<layer name>/nonzero_fraction"`.
      **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> layer = TopKActivation(k=2)
    >>> keras.ops.convert_to_numpy(
    ...     layer(np.array([[3.0, -1.0, 2.0, 5.0]], "float32")))
    array([[3., 0., 0., 5.]], dtype=float32)

    References:
      - Li et al., The Lazy Neuron Phenomenon, https://arxiv.org/abs/2210.06313
      - Chern et al., TPU-KNN, https://arxiv.org/abs/2206.14286
    """

    def __init__(self, k, method="auto", recall_target=0.95,
                 track_sparsity=True, activation="relu", metric_name=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.k = None if k is None else topk_ops.validate_k(k)
        self.method = topk_ops.validate_method(method)
        self.recall_target = topk_ops.validate_recall_target(recall_target)
        self.track_sparsity = bool(track_sparsity)
        self.activation = activation
        self._activation = _activation_function(activation)
        self.metric_name = metric_name
        self.nonzero_fraction = self.recall = None
        self.mlp_dim = None  # the width it selects from, set by build
        # As SparseMLP's: an object of topk_sparse.scoring that sees every
        # call's inputs first (input recording); it must return None, since
        # an activation has no kernel to choose neurons from.
        self.scorer = None

    def build(self, input_shape):
        mlp_dim = input_shape[-1] if input_shape else None
        if mlp_dim is None:
            raise ValueError(
                f"TopKActivation {self.name!r} needs a known last dimension, "
                f"got input shape {input_shape}.")
        self.mlp_dim = mlp_dim
        if self.k is not None:
            topk_ops.validate_k(self.k, mlp_dim)
        self.nonzero_fraction = _sparsity_metric(self, mlp_dim,
                                                 self.metric_name)
        self.recall = _recall_metric(self)

    def call(self, inputs):
        _check_floating(inputs, self)
        if self.scorer is not None and \
                self.scorer(self, inputs) is not None:
            raise TypeError(
                f"TopKActivation {self.name!r}: its scorer chose neurons, "
                f"which only a SparseMLP's can (it has the kernels).")
        outputs = inputs
        if self.k is not None:
            outputs = topk_ops.topk_mask(inputs, self.k, self.method,
                                         self.recall_target)
        # Top-k's output is relu's already.
        if self._activation is not None and (self.k is None or
                                             self.activation != "relu"):
            outputs = self._activation(outputs)
        if self.nonzero_fraction is not None:
            self.nonzero_fraction.update_state(outputs)
        if self.recall is not None:
            self.recall.update_state(inputs, outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "k": self.k,
            "method": self.method,
            "recall_target": self.recall_target,
            "track_sparsity": self.track_sparsity,
            "activation": self.activation,
            "metric_name": self.metric_name,
        }


@keras.saving.register_keras_serializable(package="topk_sparse")
class SparseMLP(MeasuredLayer):
    """Transformer MLP `V · TopK_k(relu(Kᵀx + b₁)) + b₂`, token by token.

    Args:
      mlp_dim: int. Width of the hidden layer (T5 calls it `d_ff`).
      k: int or None. Hidden activations kept per token; None keeps all
        (the plain ReLU MLP, the dense baseline). Defaults to None.
      method: str. Top-k method, see `TopKActivation`. Defaults to "auto".
      recall_target: float in (0, 1]. Expected recall of `"approx"`.
      implementation: str. `"masked"` zeroes the dropped activations and
        runs both projections densely: the fast path on batches of many
        tokens and for training. `"gather"` multiplies only the `k` kept
        rows of the output kernel: fewer FLOPs, faster at small batches.
        `"auto"` (default) gathers when the call's static number of
        tokens times `k` is at most `topk_sparse.ops.GATHER_MAX_SHARE` of
        `mlp_dim` (decoding, small-batch serving) and masks otherwise
        (unknown token counts included), and always masks with
        `method="statistical"`. All give the same outputs for the same
        weights (with `"statistical"`, while at most `k` activations of a
        token pass the cutoff: the gathered path keeps the `k` largest).
      output_dim: int or None. Output width; None means the input width.
      use_bias: bool. Whether both projections add a bias. Defaults to True.
      kernel_initializer: initializer of both kernels.
      bias_initializer: initializer of both biases.
      track_sparsity: bool. Whether the layer keeps an `NonzeroFraction`
        metric of its hidden activations (`layer.nonzero_fraction`) and,
        when its method is approximate here, a `TopKRecall`
        (`layer.recall`). Defaults to True.
      **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
    >>> mlp = SparseMLP(mlp_dim=16, k=4)
    >>> tuple(mlp(np.ones((2, 3, 8), "float32")).shape)
    (2, 3, 8)

    References:
      - Li et al., The Lazy Neuron Phenomenon, https://arxiv.org/abs/2210.06313
    """

    def __init__(self, mlp_dim, k=None, method="auto", recall_target=0.95,
                 implementation="auto", output_dim=None, use_bias=True,
                 kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", track_sparsity=True, **kwargs):
        super().__init__(**kwargs)
        mlp_dim = checks.positive_int(mlp_dim, "mlp_dim")
        if output_dim is not None:
            output_dim = checks.positive_int(output_dim, "output_dim")
        self.mlp_dim = mlp_dim
        self.k = None if k is None else topk_ops.validate_k(k, mlp_dim)
        self.method = topk_ops.validate_method(method)
        self.recall_target = topk_ops.validate_recall_target(recall_target)
        self.implementation = topk_ops.validate_implementation(implementation)
        self.output_dim = output_dim
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.track_sparsity = bool(track_sparsity)
        self.nonzero_fraction = self.recall = None
        # An object of topk_sparse.scoring (two-stage scoring, input
        # recording) that sees every call first and may choose its kept
        # neurons; None: every call scores all neurons.
        self.scorer = None

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"SparseMLP {self.name!r} needs inputs of rank >= 2 "
                f"([..., tokens, features]) with a known feature dimension, "
                f"got shape {input_shape}.")
        in_dim = input_shape[-1]
        out_dim = self.output_dim or in_dim
        self.intermediate_kernel = self._weight(
            "intermediate_kernel", (in_dim, self.mlp_dim),
            self.kernel_initializer)
        self.output_kernel = self._weight(
            "output_kernel", (self.mlp_dim, out_dim),
            self.kernel_initializer)
        self.intermediate_bias = self.output_bias = None
        if self.use_bias:
            self.intermediate_bias = self._weight(
                "intermediate_bias", (self.mlp_dim,), self.bias_initializer)
            self.output_bias = self._weight(
                "output_bias", (out_dim,), self.bias_initializer)
        self.nonzero_fraction = _sparsity_metric(self, self.mlp_dim)
        self.recall = _recall_metric(self)

    def _weight(self, name, shape, initializer):
        return self.add_weight(name=name, shape=shape, initializer=initializer)

    def call(self, inputs, training=None):
        _check_floating(inputs, self)
        if self.scorer is not None:
            chosen = self.scorer(self, inputs, training)
            if chosen is not None:  # `(values, indices)` of the kept neurons
                return self._sparse_output(*chosen)
        hidden = self.pre_activations(inputs)
        if self.gathers(inputs):
            return self._gathered_output(hidden)
        if self.k is None:
            activations = ops.relu(hidden)
        else:
            activations = topk_ops.topk_mask(hidden, self.k, self.method,
                                             self.recall_target)
        if self.nonzero_fraction is not None:
            self.nonzero_fraction.update_state(activations)
        if self.recall is not None:
            self.recall.update_state(hidden, activations)
        return topk_ops.project(activations, self.output_kernel,
                                self.output_bias)

    def gathers(self, inputs):
        """Whether a call on `inputs` takes the gathered path (decided at
        trace time, from static shapes: `topk_sparse.ops.gathers`)."""
        return topk_ops.gathers(self.implementation, self.method, self.k,
                                _tokens(inputs), self.mlp_dim)

    def reads_few_rows(self, inputs, rows_per_token):
        """Whether the call's static token count times `rows_per_token` is at
        most `topk_sparse.ops.GATHER_MAX_SHARE` of `mlp_dim`."""
        tokens = _tokens(inputs)
        return tokens is not None and tokens <= self.max_tokens(
            rows_per_token)

    def max_tokens(self, rows_per_token):
        """`topk_sparse.ops.max_gathered_tokens` of this MLP."""
        return topk_ops.max_gathered_tokens(self.mlp_dim, rows_per_token)

    def pre_activations(self, inputs):
        """`inputs @ W1 + b1`, the hidden layer before ReLU and Top-k, in
        the inputs' dtype (inside `call`, Keras has already cast the
        weights to it)."""
        bias = self.intermediate_bias
        return topk_ops.project(
            inputs, ops.cast(self.intermediate_kernel, inputs.dtype),
            None if bias is None else ops.cast(bias, inputs.dtype))

    def _gathered_output(self, hidden):
        values, indices = topk_ops.topk_activations(
            hidden, self.k, self.method, self.recall_target)
        if self.recall is not None:
            self.recall.update_from_topk(hidden, values, indices)
        return self._sparse_output(values, indices)

    def _sparse_output(self, values, indices):
        if self.nonzero_fraction is not None:
            self.nonzero_fraction.update_from_topk(values, indices)
        outputs = topk_ops.sparse_mlp_product(values, indices,
                                              self.output_kernel)
        if self.output_bias is not None:
            outputs = outputs + self.output_bias
        return outputs

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_dim or input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "mlp_dim": self.mlp_dim,
            "k": self.k,
            "method": self.method,
            "recall_target": self.recall_target,
            "implementation": self.implementation,
            "output_dim": self.output_dim,
            "use_bias": self.use_bias,
            "kernel_initializer":
                keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer":
                keras.initializers.serialize(self.bias_initializer),
            "track_sparsity": self.track_sparsity,
        }
