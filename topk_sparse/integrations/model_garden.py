"""Top-k MLPs in TensorFlow Model Garden (`tf-models-official`, tf_keras).

Model Garden is built on tf_keras (Keras 2), where this package's Keras 3
layers cannot live (a tf_keras model holding a Keras 3 `SparseMLP` shows 0
trainable weights and never trains). This module gives the same Top-k, from
`topk_sparse.ops`, in tf_keras form:

- `topk_activation(k)`: an `inner_activation` for `TransformerEncoderBlock`,
  `BertEncoder` / `BertEncoderV2`, `EncoderScaffold` (`hidden_cfg`) and
  `TransformerScaffold`. It is the tf_keras identifier of a registered
  `TopKActivation` layer, the form of `"relu"` that carries arguments:
  every block resolves it (`tf_keras.activations.get`) into its own layer
  with its own nonzero-fraction metric, `<block path>/nonzero_fraction` in
  `fit` logs, and every save format stores it as plain JSON.
- `TopKFeedforward`: a whole Top-k MLP for
  `TransformerScaffold(feedforward_cls=...)`, with the gathered inference
  path of `topk_sparse.SparseMLP`.
- `TopKVisionTransformer`: Model Garden's vision ViT
  (`official.vision.modeling.backbones.vit`), whose encoder hard-codes gelu,
  with Top-k MLPs instead (`TopKEncoder`).

Why an identifier and not a layer or a function (measured, tf-models-official
2.20, tf_keras 2.20): a plain function (`topk_sparse.ops.topk_mask`) trains
but no save format reloads it ("Unknown activation function"). A
`TopKActivation` instance trains and logs, but an encoder passes one
instance to all its blocks (one metric for all, and one per block after a
reload), and a `.keras` reload fails ("expected 2 variables, but received
0": the block holds the instance twice, as its argument and inside its
`Activation` layer). The identifier (a legacy-format config dict) avoids both.

Importing this module imports tf_keras and Model Garden; `import
topk_sparse` imports neither.

Example:
    from official.nlp.modeling import networks
    from topk_sparse.integrations import model_garden

    encoder = networks.BertEncoderV2(
        vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=2,
        inner_dim=128, inner_activation=model_garden.topk_activation(16))
"""

import re
import threading

import tensorflow as tf
import tf_keras
from official.modeling import tf_utils
from official.vision.modeling.backbones import vit

from topk_sparse import ops as topk_ops

_PACKAGE = "topk_sparse"


def topk_activation(k, method="auto", recall_target=0.95):
    """A Top-k `inner_activation` for Model Garden's Transformer blocks.

    ReLU, then each token keeps its `k` largest activations (the Top-k MLP
    of *The Lazy Neuron Phenomenon*), as `topk_sparse.ops.topk_mask`.

    Args:
      k: int. Activations kept per token; must not exceed the block's
        `inner_dim` (checked when the block is built).
      method: str. One of `topk_sparse.ops.METHOD_NAMES`. Defaults to "auto".
      recall_target: float in (0, 1]. Expected recall of `"approx"`.
        Defaults to 0.95.

    Returns:
      dict. The tf_keras identifier of a `TopKActivation` layer
      (`{"class_name": "topk_sparse>TopKActivation", "config": {...}}`),
      which `tf_keras.activations.get` turns into a new layer wherever a
      block resolves its activation: one layer and one metric per block.
      Not callable itself: call `TopKActivation(k)` or
      `topk_sparse.ops.topk_mask` directly.

    References:
      - Li et al., The Lazy Neuron Phenomenon, https://arxiv.org/abs/2210.06313
    """
    config = {"k": topk_ops.validate_k(k),
              "method": topk_ops.validate_method(method),
              "recall_target": topk_ops.validate_recall_target(recall_target)}
    return {"class_name": f"{_PACKAGE}>TopKActivation", "config": config}


def _topk_arguments(identifier):
    """`(k, method, recall_target)` of a `topk_activation` identifier (also
    after a save, when tf_keras may have wrapped the dict), else None."""
    try:
        if identifier["class_name"] != f"{_PACKAGE}>TopKActivation":
            return None
        config = identifier["config"]
        return (config["k"], config.get("method", "auto"),
                config.get("recall_target", 0.95))
    except (TypeError, KeyError):
        return None


class NonzeroFraction(tf_keras.metrics.Metric):
    """Running share of positive activations per token (tf_keras metric).

    The measure of `topk_sparse.NonzeroFraction` (the paper's activation
    sparsity), in tf_keras form so that tf_keras `fit` logs it. NaN tokens
    are skipped, as there. `update_state` takes the full activations
    `[..., mlp_dim]` or only the kept values `[..., k]` of a token (the
    gathered path): the count of positive entries over `mlp_dim` is the
    same.

    Args:
      mlp_dim: int. Size of the hidden dimension.
      name: str. Metric name (the key in `fit` logs).
    """

    def __init__(self, mlp_dim, name="nonzero_fraction", **kwargs):
        super().__init__(name=name, **kwargs)
        self.mlp_dim = int(mlp_dim)
        self.nonzero_count = self.add_weight(
            "nonzero_count", shape=(), initializer="zeros")
        self.token_count = self.add_weight(
            "token_count", shape=(), initializer="zeros")

    def update_state(self, activations):
        values = tf.cast(activations, tf.float32)
        values = tf.reshape(values, [-1, values.shape[-1]])
        # A NaN token's activations sum to NaN (entries are >= 0 or NaN).
        valid = tf.logical_not(tf.math.is_nan(tf.reduce_sum(values, 1)))
        fired = tf.logical_and(values > 0, valid[:, None])
        self.nonzero_count.assign_add(
            tf.reduce_sum(tf.cast(fired, tf.float32)))
        self.token_count.assign_add(tf.reduce_sum(tf.cast(valid, tf.float32)))

    def result(self):
        return tf.math.divide_no_nan(self.nonzero_count,
                                     self.token_count * self.mlp_dim)

    def get_config(self):
        return {**super().get_config(), "mlp_dim": self.mlp_dim}


# The `Activation` layer that Model Garden's blocks wrap their
# `inner_activation` in (auto-named "activation", "activation_1", ...).
_ACTIVATION_WRAPPER = re.compile(r"activation(_\d+)?")


def _metric_name(layer, owner_of_wrapped=False):
    """`<path>/nonzero_fraction`, the path read off the name scope `layer`
    is built in (`block_0/activation/top_k_activation`). With
    `owner_of_wrapped`, a layer wrapped in a block's `Activation` layer is
    named after the block (`block_0`). Outside any scope (a first eager
    call): the layer's name."""
    parts = [p for p in tf.get_current_name_scope().split("/") if p]
    if (owner_of_wrapped and len(parts) >= 3
            and _ACTIVATION_WRAPPER.fullmatch(parts[-2])):
        parts = parts[:-2]
    return "/".join(parts or [layer.name]) + "/nonzero_fraction"


@tf_keras.utils.register_keras_serializable(package=_PACKAGE)
class TopKActivation(tf_keras.layers.Layer):
    """ReLU, then keep per token the `k` largest activations (tf_keras).

    The tf_keras twin of `topk_sparse.TopKActivation`. In Model Garden,
    pass `topk_activation(k)` (its identifier) as `inner_activation`
    rather than an instance: see the module docstring.

    Args:
      k: int. Activations kept per token, at most the last input dimension.
      method: str. One of `topk_sparse.ops.METHOD_NAMES`. Defaults to "auto".
      recall_target: float in (0, 1]. Expected recall of `"approx"`.
      track_sparsity: bool. Whether the layer keeps a `NonzeroFraction`
        metric (`layer.nonzero_fraction`), named `<block>/nonzero_fraction`
        inside a Model Garden block. Defaults to True.
      **kwargs: base layer arguments.

    Example:
    >>> TopKActivation(2)(tf.constant([[3.0, -1.0, 2.0, 5.0]])).numpy()
    array([[3., 0., 0., 5.]], dtype=float32)
    """

    def __init__(self, k, method="auto", recall_target=0.95,
                 track_sparsity=True, **kwargs):
        super().__init__(**kwargs)
        self.k = topk_ops.validate_k(k)
        self.method = topk_ops.validate_method(method)
        self.recall_target = topk_ops.validate_recall_target(recall_target)
        self.track_sparsity = bool(track_sparsity)
        self.nonzero_fraction = None

    def build(self, input_shape):
        mlp_dim = tf.TensorShape(input_shape)[-1]
        if mlp_dim is None:
            raise ValueError(
                f"TopKActivation {self.name!r} needs a known last dimension, "
                f"got input shape {input_shape}.")
        topk_ops.validate_k(self.k, mlp_dim)
        if self.track_sparsity:
            self.nonzero_fraction = NonzeroFraction(
                mlp_dim, name=_metric_name(self, owner_of_wrapped=True))
        super().build(input_shape)

    def call(self, inputs):
        outputs = topk_ops.topk_mask(inputs, self.k, self.method,
                                     self.recall_target)
        if self.nonzero_fraction is not None:
            self.nonzero_fraction.update_state(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "k": self.k, "method": self.method,
                "recall_target": self.recall_target,
                "track_sparsity": self.track_sparsity}


@tf_keras.utils.register_keras_serializable(package=_PACKAGE)
class TopKFeedforward(tf_keras.layers.Layer):
    """A Top-k Transformer MLP for `TransformerScaffold(feedforward_cls=)`.

    `dropout(V · TopK_k(relu(Kᵀx + b₁)) + b₂)`, then, with
    `apply_output_layer_norm`, `LayerNorm(that + x)`: the contract of Model
    Garden's `GatedFeedforward` (a scaffold with `norm_first=False` expects
    the feedforward to add the residual and normalize; with
    `norm_first=True`, pass `apply_output_layer_norm=False`). Like
    `topk_sparse.SparseMLP`, it can compute the second projection from the
    `k` kept rows only (`implementation`).

    Given as a class without `feedforward_cfg`, the scaffold passes its own
    arguments: `inner_dim`, `inner_activation` (then
    `topk_activation(k)`, where `k` and `method` are read from), dropout,
    initializers and regularizers.

    Args:
      inner_dim: int. Hidden width (`intermediate_size` is accepted too).
      k: int or None. Activations kept per token; None: from
        `inner_activation`, which must then be a `topk_activation`.
      method, recall_target: see `topk_activation`.
      implementation: "masked", "gather" or "auto" (gathers when the
        call's static token count times `k` is at most
        `topk_sparse.ops.GATHER_MAX_SHARE` of `inner_dim`, never with
        `"statistical"`), as in `SparseMLP`. Defaults to "auto".
      dropout: float. Dropout on the output. Defaults to 0.
      apply_output_layer_norm: bool. Add the input and apply a float32
        LayerNorm. Defaults to True (the scaffold's `norm_first=False`).
      norm_epsilon: float. LayerNorm epsilon. Defaults to 1e-12.
      use_bias: bool. Defaults to True.
      kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, kernel_constraint, bias_constraint: of both
        projections.
      track_sparsity: bool. Whether to keep a `NonzeroFraction`,
        `<scope>/nonzero_fraction`. Defaults to True.
      **kwargs: base layer arguments; the scaffold's `inner_activation`,
        `intermediate_size` and `intermediate_activation`.
    """

    def __init__(self, inner_dim=None, k=None, method=None,
                 recall_target=None, implementation="auto", dropout=0.0,
                 apply_output_layer_norm=True, norm_epsilon=1e-12,
                 use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, track_sparsity=True,
                 inner_activation=None, intermediate_size=None,
                 intermediate_activation=None, **kwargs):
        super().__init__(**kwargs)
        inner_dim = inner_dim or intermediate_size
        if inner_dim is None:
            raise ValueError("TopKFeedforward needs inner_dim.")
        from_activation = _topk_arguments(
            inner_activation or intermediate_activation) or (None,) * 3
        if k is None and from_activation[0] is None:
            raise ValueError(
                "TopKFeedforward needs k: pass feedforward_cfg={'k': ...} "
                "or the scaffold's inner_activation=topk_activation(k); got "
                f"inner_activation={inner_activation!r}.")
        self.inner_dim = int(inner_dim)
        self.k = topk_ops.validate_k(
            k if k is not None else from_activation[0], self.inner_dim)
        self.method = topk_ops.validate_method(
            method or from_activation[1] or "auto")
        self.recall_target = topk_ops.validate_recall_target(
            recall_target or from_activation[2] or 0.95)
        self.implementation = topk_ops.validate_implementation(implementation)
        self.dropout = float(dropout)
        self.apply_output_layer_norm = bool(apply_output_layer_norm)
        self.norm_epsilon = float(norm_epsilon)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = tf_keras.initializers.get(
            kernel_initializer)
        self.bias_initializer = tf_keras.initializers.get(bias_initializer)
        self.kernel_regularizer = tf_keras.regularizers.get(
            kernel_regularizer)
        self.bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = tf_keras.constraints.get(kernel_constraint)
        self.bias_constraint = tf_keras.constraints.get(bias_constraint)
        self.track_sparsity = bool(track_sparsity)
        self.nonzero_fraction = None

    def build(self, input_shape):
        width = tf.TensorShape(input_shape)[-1]
        if width is None:
            raise ValueError(
                f"TopKFeedforward {self.name!r} needs a known feature "
                f"dimension, got input shape {input_shape}.")

        def weight(name, shape, kernel):
            # A clone per weight, as Model Garden's blocks do: one unseeded
            # tf_keras initializer gives the same values at every call.
            return self.add_weight(
                name, shape=shape,
                initializer=tf_utils.clone_initializer(
                    self.kernel_initializer if kernel
                    else self.bias_initializer),
                regularizer=(self.kernel_regularizer if kernel
                             else self.bias_regularizer),
                constraint=(self.kernel_constraint if kernel
                            else self.bias_constraint))

        self.intermediate_kernel = weight(
            "intermediate_kernel", (width, self.inner_dim), True)
        self.output_kernel = weight("output_kernel", (self.inner_dim, width),
                                    True)
        self.intermediate_bias = self.output_bias = None
        if self.use_bias:
            self.intermediate_bias = weight(
                "intermediate_bias", (self.inner_dim,), False)
            self.output_bias = weight("output_bias", (width,), False)
        self._output_dropout = tf_keras.layers.Dropout(self.dropout)
        self._output_layer_norm = None
        if self.apply_output_layer_norm:
            # float32, as the scaffold's own layer norms.
            self._output_layer_norm = tf_keras.layers.LayerNormalization(
                axis=-1, epsilon=self.norm_epsilon, dtype=tf.float32,
                name="output_layer_norm")
        if self.track_sparsity:
            self.nonzero_fraction = NonzeroFraction(
                self.inner_dim, name=_metric_name(self))
        super().build(input_shape)

    def gathers(self, inputs):
        """Whether a call on `inputs` takes the gathered path (static:
        `topk_sparse.ops.gathers`)."""
        return topk_ops.gathers(
            self.implementation, self.method, self.k,
            inputs.shape[:-1].num_elements(), self.inner_dim)

    def call(self, inputs, training=None):
        hidden = topk_ops.project(inputs, self.intermediate_kernel,
                          self.intermediate_bias)
        if self.gathers(inputs):
            values, indices = topk_ops.topk_activations(
                hidden, self.k, self.method, self.recall_target)
            kept = values
            outputs = topk_ops.sparse_mlp_product(values, indices,
                                                  self.output_kernel)
            if self.output_bias is not None:
                outputs = outputs + self.output_bias
        else:
            kept = topk_ops.topk_mask(hidden, self.k, self.method,
                                      self.recall_target)
            outputs = topk_ops.project(kept, self.output_kernel,
                                       self.output_bias)
        if self.nonzero_fraction is not None:
            self.nonzero_fraction.update_state(kept)
        outputs = self._output_dropout(outputs, training=training)
        if self._output_layer_norm is not None:
            outputs = self._output_layer_norm(
                tf.cast(outputs, tf.float32) + tf.cast(inputs, tf.float32))
        return outputs

    def get_config(self):
        return {
            **super().get_config(),
            "inner_dim": self.inner_dim,
            "k": self.k,
            "method": self.method,
            "recall_target": self.recall_target,
            "implementation": self.implementation,
            "dropout": self.dropout,
            "apply_output_layer_norm": self.apply_output_layer_norm,
            "norm_epsilon": self.norm_epsilon,
            "use_bias": self.use_bias,
            "kernel_initializer":
                tf_keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer":
                tf_keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer":
                tf_keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer":
                tf_keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint":
                tf_keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint":
                tf_keras.constraints.serialize(self.bias_constraint),
            "track_sparsity": self.track_sparsity,
        }


@tf_keras.utils.register_keras_serializable(package=_PACKAGE)
class TopKEncoder(vit.Encoder):
    """Model Garden's ViT encoder with Top-k MLPs.

    `official.vision.modeling.backbones.vit.Encoder` builds its blocks with
    `inner_activation=gelu` and no argument to change it. This subclass
    takes `k`, `method` and `recall_target` (saved in its config) and gives
    each block, before it is built, `inner_activation=topk_activation(k,
    ...)` in place of gelu: the blocks' configs
    then carry the Top-k too, and the variables (their order, and so
    checkpoints and `get_weights`) are laid out as in the dense encoder.

    Args:
      k, method, recall_target: see `topk_activation`.
      *args, **kwargs: those of `vit.Encoder`.
    """

    def __init__(self, *args, k, method="auto", recall_target=0.95,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._topk = topk_activation(k, method, recall_target)

    def build(self, input_shape):
        super().build(input_shape)
        for block in self._encoder_layers:
            # The block reads its `inner_activation` argument when it is
            # built (its first call, after this) and returns it from
            # get_config. Set on the unbuilt block, it is as if passed to
            # the constructor, which `vit.Encoder.build` calls with gelu.
            # Remaking the block from its config instead would lose
            # `return_attention_scores` (missing from that config in
            # tf-models-official 2.20) and reorder the encoder's weights.
            if block.built or not hasattr(block, "_inner_activation"):
                raise TypeError(
                    f"{type(block).__name__} changed: TopKEncoder sets its "
                    "`_inner_activation` before it is built. Pin "
                    "tf-models-official==2.20.0.")
            block._inner_activation = topk_activation(**self._topk["config"])

    def get_config(self):
        return {**super().get_config(), **self._topk["config"]}


_ENCODER_SWAP = threading.Lock()


class TopKVisionTransformer(vit.VisionTransformer):
    """Model Garden's vision ViT (`vit.VisionTransformer`) with Top-k MLPs.

    `VisionTransformer.__init__` builds a `vit.Encoder` it looks up in its
    module, with no argument to choose another: for the duration of this
    constructor (under a lock) that name is `TopKEncoder` with `k`,
    `method` and `recall_target`. The model is otherwise
    `VisionTransformer` (same arguments, `output_specs`, endpoints, and
    variables laid out as in the dense model, so a dense checkpoint
    restores into it). Model Garden saves vision backbones as checkpoints
    and SavedModels, not configs: both keep the Top-k
    (`tests/integrations/test_model_garden.py`).

    Args:
      k, method, recall_target: see `topk_activation`; `k` at most
        `mlp_dim`.
      **kwargs: those of `vit.VisionTransformer` (`mlp_dim`, `num_heads`,
        `num_layers`, `hidden_size`, `patch_size`, `input_specs`, ...).
    """

    def __init__(self, k, method="auto", recall_target=0.95, **kwargs):
        topk = topk_activation(k, method, recall_target)["config"]
        topk_ops.validate_k(k, kwargs.get("mlp_dim", 3072))

        def encoder(*args, **encoder_kwargs):
            return TopKEncoder(*args, **topk, **encoder_kwargs)

        with _ENCODER_SWAP:
            dense_encoder, vit.Encoder = vit.Encoder, encoder
            try:
                super().__init__(**kwargs)
            finally:
                vit.Encoder = dense_encoder
