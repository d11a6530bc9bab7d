"""One pre-LayerNorm Transformer block with a Top-k sparse MLP.

ViT and T5 are both stacks of this block (the models differ in the norm, the
biases, causality and cross-attention):

    x = x + Dropout(SelfAttention(Norm(x), bias))
    x = x + Dropout(CrossAttention(Norm(x), context))    # T5 decoder only
    x = x + Dropout(SparseMLP(Norm(x)))

The MLP is `topk_sparse.SparseMLP`: `V · TopK_k(relu(Kᵀx))`, with `k=None`
the dense ReLU baseline of *The Lazy Neuron Phenomenon* (arXiv 2210.06313).

`MultiHeadAttention` is our own small layer rather than Keras's because T5
adds a learned relative position bias to the attention logits; one
implementation serves both models. `TransformerBlock.decode` runs one
position with a key/value cache, for `T5.generate`.
"""

import keras
from keras import ops

from topk_sparse.layers import SparseMLP

NORMS = ("layer", "rms")

# Added to the logits of masked positions. Finite, so that a row with every
# key masked (an all-padding sequence) gives uniform weights, not NaN; the
# logits are float32 when it is added, also under mixed precision.
_MASKED_LOGIT = -1e9


def _dim(x, axis):
    """Static size of `x` along `axis` when known, else the dynamic one."""
    return ops.shape(x)[axis]


@keras.saving.register_keras_serializable(package="topk_sparse")
class MultiHeadAttention(keras.layers.Layer):
    """Scaled dot-product attention that adds an optional bias to the logits.

    Args:
      num_heads: int. Number of attention heads.
      head_dim: int. Width of each head's queries, keys and values.
      use_bias: bool. Whether the four projections add a bias (ViT: True,
        T5: False). Defaults to True.
      causal: bool. Whether query `i` may only attend to keys `j <= i`
        (the T5 decoder's self-attention). Defaults to False.
      **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
      query: float `[batch, q_len, width]`.
      context: float `[batch, kv_len, context_width]` to attend to, or None
        for self-attention.
      attention_bias: float, broadcastable to `[batch, heads, q_len, kv_len]`,
        added to the logits (T5's relative position bias), or None.
      key_mask: bool `[batch, kv_len]`, False at keys to ignore (padding), or
        None.

    Example:
    >>> attention = MultiHeadAttention(num_heads=2, head_dim=4)
    >>> tuple(attention(np.ones((1, 3, 8), "float32")).shape)
    (1, 3, 8)
    """

    def __init__(self, num_heads, head_dim, use_bias=True, causal=False,
                 **kwargs):
        super().__init__(**kwargs)
        for arg, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or value <= 0:
                raise ValueError(
                    f"{arg} must be a positive int, got {value!r}.")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.use_bias = bool(use_bias)
        self.causal = bool(causal)

    def build(self, query_shape, context_shape=None):
        context_shape = query_shape if context_shape is None else context_shape
        inner = self.num_heads * self.head_dim

        def dense(name, units, shape):
            layer = keras.layers.Dense(units, use_bias=self.use_bias,
                                       name=name, dtype=self.dtype_policy)
            layer.build(shape)
            return layer

        self.query_dense = dense("query", inner, query_shape)
        self.key_dense = dense("key", inner, context_shape)
        self.value_dense = dense("value", inner, context_shape)
        self.output_dense = dense("attention_output", query_shape[-1],
                                  (*query_shape[:-1], inner))

    def _split_heads(self, x):
        """`[batch, len, heads * head_dim]` to `[batch, heads, len, dim]`."""
        x = ops.reshape(x, (-1, _dim(x, 1), self.num_heads, self.head_dim))
        return ops.transpose(x, (0, 2, 1, 3))

    def call(self, query, context=None, attention_bias=None, key_mask=None):
        keys, values = self.keys_and_values(
            query if context is None else context)
        mask = None
        if key_mask is not None:
            mask = ops.cast(key_mask, "bool")[:, None, None, :]
        if self.causal:
            lower = ops.cast(ops.tril(ops.ones(
                (_dim(query, 1), _dim(keys, 2)), "int32")), "bool")
            mask = lower if mask is None else ops.logical_and(mask, lower)
        return self.attend(query, keys, values, attention_bias, mask)

    def keys_and_values(self, context):
        """The keys and values of `context` (`[batch, kv_len, width]`), each
        `[batch, heads, kv_len, head_dim]`: what a decoding cache holds."""
        return (self._split_heads(self.key_dense(context)),
                self._split_heads(self.value_dense(context)))

    def attend(self, query, keys, values, attention_bias=None, mask=None):
        """Attention of `query` (`[batch, q_len, width]`) to given `keys` and
        `values` (`[batch, heads, kv_len, head_dim]`, from
        `keys_and_values`, or a decoding cache).

        `attention_bias` is added to the logits; `mask` (bool, broadcastable
        to `[batch, heads, q_len, kv_len]`) is False at keys to ignore.
        Returns `[batch, q_len, width]`.
        """
        q = self._split_heads(self.query_dense(query))
        q *= self.head_dim ** -0.5
        # Softmax in float32: under mixed_bfloat16 the masked logits and the
        # normalization stay exact.
        logits = ops.cast(ops.matmul(q, ops.swapaxes(keys, -1, -2)),
                          "float32")
        if attention_bias is not None:
            logits += ops.cast(attention_bias, "float32")
        if mask is not None:
            logits = ops.where(mask, logits, _MASKED_LOGIT)
        weights = ops.cast(ops.softmax(logits, axis=-1), self.compute_dtype)
        heads = ops.transpose(ops.matmul(weights, values), (0, 2, 1, 3))
        merged = ops.reshape(heads, (-1, _dim(heads, 1),
                                     self.num_heads * self.head_dim))
        return self.output_dense(merged)

    def compute_output_shape(self, query_shape, context_shape=None):
        return query_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "use_bias": self.use_bias,
            "causal": self.causal,
        }


@keras.saving.register_keras_serializable(package="topk_sparse")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm Transformer block whose MLP is a Top-k `SparseMLP`.

    The MLP layer is named `<block name>_mlp`, so that each block's
    `<block name>_mlp/nonzero_fraction` is its own key in `fit` logs.

    Args:
      num_heads: int. Attention heads; must divide the input width.
      mlp_dim: int. Hidden width of the MLP (T5 calls it `d_ff`).
      k: int or None. MLP activations kept per token; None is the dense ReLU
        MLP. Defaults to None.
      method: str. Top-k method, one of `topk_sparse.ops.METHOD_NAMES`, see
        `topk_sparse.TopKActivation`. Defaults to "auto".
      recall_target: float in (0, 1]. Expected recall of `"approx"`.
        Defaults to 0.95.
      implementation: str. `SparseMLP` path: `"masked"`, `"gather"` or
        `"auto"` (default: gathers in calls of few tokens, see `SparseMLP`).
      dropout_rate: float in [0, 1). Dropout on each residual branch.
        Defaults to 0.
      norm: str. `"layer"` (LayerNorm, ViT) or `"rms"` (T5's LayerNorm:
        scale only, no mean subtraction, no bias). Defaults to "layer".
      norm_epsilon: float. Epsilon of the norms. Defaults to 1e-6.
      use_bias: bool. Whether attention and MLP projections add biases (T5
        has none). Defaults to True.
      causal: bool. Causal self-attention (decoder). Defaults to False.
      cross_attention: bool. Whether the block attends to a `context`
        (T5 decoder). Defaults to False.
      **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
      inputs: float `[batch, length, width]`.
      context: float `[batch, context_length, context_width]`, needed when
        `cross_attention` is True.
      attention_bias: additive self-attention logit bias, broadcastable to
        `[batch, heads, length, length]`, or None.
      padding_mask: bool `[batch, length]`, False at padding keys, or None.
      context_padding_mask: bool `[batch, context_length]`, or None.

    Example:
    >>> block = TransformerBlock(num_heads=2, mlp_dim=32, k=4)
    >>> tuple(block(np.ones((2, 5, 8), "float32")).shape)
    (2, 5, 8)

    References:
      - Li et al., The Lazy Neuron Phenomenon, https://arxiv.org/abs/2210.06313
      - Vaswani et al., Attention Is All You Need,
        https://arxiv.org/abs/1706.03762
    """

    def __init__(self, num_heads, mlp_dim, k=None, method="auto",
                 recall_target=0.95, implementation="auto",
                 dropout_rate=0.0, norm="layer", norm_epsilon=1e-6,
                 use_bias=True, causal=False, cross_attention=False,
                 **kwargs):
        super().__init__(**kwargs)
        if norm not in NORMS:
            raise ValueError(f"Unknown norm {norm!r}: choose one of {NORMS}.")
        if not 0.0 <= float(dropout_rate) < 1.0:
            raise ValueError(
                f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.k = k
        self.method = method
        self.recall_target = recall_target
        self.implementation = implementation
        self.dropout_rate = float(dropout_rate)
        self.norm = norm
        self.norm_epsilon = norm_epsilon
        self.use_bias = bool(use_bias)
        self.causal = bool(causal)
        self.cross_attention = bool(cross_attention)
        # Made here, not in build(), so that bad MLP arguments (k > mlp_dim,
        # an unknown method) fail when the block is made.
        self.mlp = SparseMLP(
            mlp_dim=mlp_dim, k=k, method=method,
            recall_target=recall_target, implementation=implementation,
            use_bias=use_bias, name=f"{self.name}_mlp",
            dtype=self.dtype_policy)

    def _norm(self, name, shape):
        if self.norm == "rms":
            layer = keras.layers.RMSNormalization(
                epsilon=self.norm_epsilon, name=name, dtype=self.dtype_policy)
        else:
            layer = keras.layers.LayerNormalization(
                epsilon=self.norm_epsilon, name=name, dtype=self.dtype_policy)
        layer.build(shape)
        return layer

    def build(self, inputs_shape, context_shape=None):
        width = inputs_shape[-1]
        if width is None or width % self.num_heads:
            raise ValueError(
                f"TransformerBlock {self.name!r}: the width {width} must be "
                f"divisible by num_heads={self.num_heads}.")
        if self.cross_attention and context_shape is None:
            raise ValueError(
                f"TransformerBlock {self.name!r} has cross_attention=True "
                f"and needs a `context` input.")
        head_dim = width // self.num_heads
        self.attention_norm = self._norm("attention_norm", inputs_shape)
        self.attention = MultiHeadAttention(
            self.num_heads, head_dim, use_bias=self.use_bias,
            causal=self.causal, name="attention", dtype=self.dtype_policy)
        self.attention.build(inputs_shape)
        if self.cross_attention:
            self.cross_attention_norm = self._norm("cross_attention_norm",
                                                   inputs_shape)
            self.cross_attention_layer = MultiHeadAttention(
                self.num_heads, head_dim, use_bias=self.use_bias,
                name="cross_attention", dtype=self.dtype_policy)
            self.cross_attention_layer.build(inputs_shape, context_shape)
        self.mlp_norm = self._norm("mlp_norm", inputs_shape)
        self.mlp.build(inputs_shape)
        self.dropout = keras.layers.Dropout(self.dropout_rate,
                                            dtype=self.dtype_policy)

    def call(self, inputs, context=None, attention_bias=None,
             padding_mask=None, context_padding_mask=None, training=None):
        x = inputs
        y = self.attention(self.attention_norm(x),
                           attention_bias=attention_bias,
                           key_mask=padding_mask)
        x = x + self.dropout(y, training=training)
        if self.cross_attention:
            y = self.cross_attention_layer(self.cross_attention_norm(x),
                                           context,
                                           key_mask=context_padding_mask)
            x = x + self.dropout(y, training=training)
        y = self.mlp(self.mlp_norm(x))
        return x + self.dropout(y, training=training)

    def decode(self, inputs, cache, write, written, attention_bias=None,
               context_cache=None, context_padding_mask=None):
        """One step of incremental decoding (inference: no dropout).

        The self-attention keys and values of earlier tokens come from
        `cache` instead of being recomputed; this token's are written into
        it at `write`. Shapes stay static: the cache always holds
        `max_length` positions, those not yet written are masked.

        Args:
          inputs: float `[batch, 1, width]`, this step's token.
          cache: `(keys, values)`, each `[batch, heads, max_length,
            head_dim]`: the self-attention keys and values of the tokens
            before (zeros where not yet written).
          write: bool `[max_length]`, True at this step's position only.
          written: bool `[max_length]`, True at the positions written so
            far, this step's included: the keys attended to.
          attention_bias: self-attention logit bias of this position,
            broadcastable to `[batch, heads, 1, max_length]`, or None.
          context_cache: `(keys, values)` of the cross-attention context,
            from `context_keys_and_values` (computed once per sequence).
          context_padding_mask: bool `[batch, context_length]`, or None.

        Returns:
          `(outputs [batch, 1, width], cache)`, the cache with this step's
          keys and values written.
        """
        x = inputs
        normed = self.attention_norm(x)
        # A one-hot write over the position axis: the same static-shape
        # program for every step, on every device. An in-place scatter at
        # the position measured no faster here (T5-Base, batch 1 to 16,
        # CPU time within 3%), so the simpler select stays.
        cache = tuple(ops.where(write[:, None], new, old) for new, old in
                      zip(self.attention.keys_and_values(normed), cache))
        y = self.attention.attend(normed, *cache, attention_bias,
                                  written[None, None, None, :])
        x = x + y
        if self.cross_attention:
            mask = None
            if context_padding_mask is not None:
                mask = ops.cast(context_padding_mask,
                                "bool")[:, None, None, :]
            x = x + self.cross_attention_layer.attend(
                self.cross_attention_norm(x), *context_cache, mask=mask)
        return x + self.mlp(self.mlp_norm(x)), cache

    def context_keys_and_values(self, context):
        """Cross-attention keys and values of `context`, each `[batch,
        heads, context_length, head_dim]`, for `decode`."""
        return self.cross_attention_layer.keys_and_values(context)

    def compute_output_shape(self, inputs_shape, context_shape=None):
        return inputs_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "k": self.k,
            "method": self.method,
            "recall_target": self.recall_target,
            "implementation": self.implementation,
            "dropout_rate": self.dropout_rate,
            "norm": self.norm,
            "norm_epsilon": self.norm_epsilon,
            "use_bias": self.use_bias,
            "causal": self.causal,
            "cross_attention": self.cross_attention,
        }
