"""T5 v1.0 encoder-decoder (arXiv 1910.10683) with Top-k sparse MLPs.

As in T5 v1.0: one token embedding shared by encoder, decoder and the output
projection (logits = (x · width^-0.5) Eᵀ), bucketed relative position
biases (bidirectional in the encoder, causal in the decoder; computed once
per stack and shared by its blocks), T5's LayerNorm (RMS scale only, no mean
subtraction, no bias), no biases in any projection, ReLU MLPs. The MLPs are
`topk_sparse.SparseMLP`: `k=None` is T5, `k=128` the Lazy Neuron paper's
Top-128 T5 (arXiv 2210.06313).

One simplification: the attention logits are scaled by `head_dim^-0.5`
(T5 folds that factor into the query initialization instead), so that one
attention layer serves ViT and T5.
"""

import math

import keras
import tensorflow as tf

from topk_sparse.models.transformer import TransformerBlock
from topk_sparse.models.vit import resolve_variant

# Raffel et al., arXiv 1910.10683, Sec. 3.1.1 and Sec. 3.7 ("Small", "Base",
# "Large"): d_model -> width, d_ff -> mlp_dim, layers per stack -> depth;
# d_kv = width / num_heads = 64 in all three. "tiny" is CPU-sized for tests
# and demos, not from the paper.
T5_VARIANTS = {
    "small": dict(width=512, depth=6, num_heads=8, mlp_dim=2048),
    "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "large": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "tiny": dict(width=64, depth=2, num_heads=4, mlp_dim=256),
}

PAD_ID = 0
"""Padding id, masked in attention; also the decoder's start id (as in T5)."""


def relative_position_bucket(relative_position, bidirectional=True,
                             num_buckets=32, max_distance=128):
    """T5's bucket of each relative position `key - query`.

    Half of the buckets (all of them when causal) hold distances exactly up
    to `num_buckets // 2` (resp. `// 4` when bidirectional), the rest
    logarithmically larger distances up to `max_distance`; farther ones share
    the last bucket. Bidirectional: keys after the query (positive relative
    positions) use the upper half of the buckets. Causal: keys after the
    query all fall in bucket 0 (they are masked anyway).

    Args:
      relative_position: int tensor, `key_position - query_position`.
      bidirectional: bool. Encoder (True) or decoder (False) buckets.
      num_buckets: int. Number of buckets. Defaults to 32 (T5).
      max_distance: int. Distance at which the last bucket starts.
        Defaults to 128 (T5).

    Returns:
      int32 tensor like `relative_position`, values in `[0, num_buckets)`.
    """
    n = -tf.cast(relative_position, tf.int32)  # query - key
    bucket = tf.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket += tf.cast(n < 0, tf.int32) * num_buckets
        n = tf.abs(n)
    else:
        n = tf.maximum(n, 0)
    max_exact = num_buckets // 2
    # log(n / max_exact) is only used where n >= max_exact; the maximum
    # keeps it finite elsewhere.
    scaled = tf.math.log(
        tf.cast(tf.maximum(n, max_exact), tf.float32) / max_exact
    ) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = tf.minimum(max_exact + tf.cast(scaled, tf.int32), num_buckets - 1)
    return bucket + tf.where(n < max_exact, n, large)


@keras.saving.register_keras_serializable(package="topk_sparse")
class RelativePositionBias(keras.layers.Layer):
    """T5's learned attention-logit bias per head and relative position bucket.

    Args:
      num_heads: int. Attention heads.
      bidirectional: bool. Encoder (True) or causal decoder (False) buckets.
      num_buckets: int. Defaults to 32 (T5).
      max_distance: int. Defaults to 128 (T5).
      **kwargs: base layer arguments.

    Call arguments:
      query: `[batch, q_len, ...]`; only its length is used.
      key: `[batch, kv_len, ...]`, or None for `query`.

    Returns:
      `[1, num_heads, q_len, kv_len]`, to add to the attention logits.
    """

    def __init__(self, num_heads, bidirectional=True, num_buckets=32,
                 max_distance=128, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.bidirectional = bool(bidirectional)
        self.num_buckets = num_buckets
        self.max_distance = max_distance

    def build(self, query_shape, key_shape=None):
        self.embedding = self.add_weight(
            name="embedding", shape=(self.num_buckets, self.num_heads),
            initializer=keras.initializers.RandomNormal(stddev=0.05))

    def call(self, query, key=None):
        key = query if key is None else key
        q_len, kv_len = tf.shape(query)[1], tf.shape(key)[1]
        relative = tf.range(kv_len)[None, :] - tf.range(q_len)[:, None]
        buckets = relative_position_bucket(
            relative, self.bidirectional, self.num_buckets, self.max_distance)
        bias = tf.gather(tf.cast(self.embedding, self.compute_dtype), buckets)
        return tf.transpose(bias, [2, 0, 1])[None]

    def compute_output_shape(self, query_shape, key_shape=None):
        key_shape = query_shape if key_shape is None else key_shape
        return (1, self.num_heads, query_shape[1], key_shape[1])

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "bidirectional": self.bidirectional,
            "num_buckets": self.num_buckets,
            "max_distance": self.max_distance,
        }


@keras.saving.register_keras_serializable(package="topk_sparse")
class SharedEmbedding(keras.layers.Layer):
    """Token embedding that is also the output projection (`reverse=True`).

    Args:
      vocab_size: int. Number of tokens.
      width: int. Embedding width.
      reverse_scale: float. Factor on the inputs of the output projection
        (T5 v1.0: `width ** -0.5`). Defaults to 1.
      **kwargs: base layer arguments.
    """

    def __init__(self, vocab_size, width, reverse_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.width = width
        self.reverse_scale = float(reverse_scale)

    def build(self, inputs_shape):
        # T5 initializes the embedding with unit variance.
        self.embedding = self.add_weight(
            name="embedding", shape=(self.vocab_size, self.width),
            initializer=keras.initializers.RandomNormal(stddev=1.0))

    def call(self, inputs, reverse=False):
        embedding = tf.cast(self.embedding, self.compute_dtype)
        if reverse:
            # Scaled here, not by the caller: in Keras 3.15 a Keras tensor
            # times a Python float is marked sparse and breaks the graph.
            return tf.matmul(inputs * self.reverse_scale, embedding,
                             transpose_b=True)
        return tf.gather(embedding, tf.cast(inputs, tf.int32))

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "width": self.width, "reverse_scale": self.reverse_scale}


@keras.saving.register_keras_serializable(package="topk_sparse")
class T5(keras.Model):
    """T5 encoder-decoder whose MLPs keep the top `k` activations per token.

    A functional model, built when made (it can be made inside a
    `tf.distribute` scope). Trained with teacher forcing: the decoder reads
    the targets shifted right behind the start id 0.

    Args:
      variant: str or None. A key of `T5_VARIANTS` ("small", "base",
        "large", "tiny"), or None to give every dimension below.
      vocab_size: int. Vocabulary size. Defaults to 32128 (T5's
        SentencePiece vocabulary, padded).
      width: int. `d_model`. Overrides the variant's.
      depth: int. Blocks in the encoder and in the decoder. Overrides the
        variant's.
      num_heads: int. Attention heads. Overrides the variant's.
      mlp_dim: int. MLP hidden width (T5 calls it `d_ff`). Overrides the variant's.
      k: int or None. MLP activations kept per token; None is the dense T5.
        Defaults to None.
      method: str. Top-k method, see `topk_sparse.TopKActivation`.
      recall_target: float in (0, 1]. Expected recall of `"approx"`.
      implementation: str. `SparseMLP` path: `"masked"`, `"gather"` or
        `"auto"` (default: gathers in calls of few tokens, see `SparseMLP`).
      dropout_rate: float in [0, 1). Dropout on the embeddings, every
        residual branch and the stacks' outputs. Defaults to 0.1 (T5).
      num_buckets: int. Relative position buckets. Defaults to 32 (T5).
      max_distance: int. Relative distance of the last bucket. Defaults to
        128 (T5).
      dtype: dtype policy of every layer, or None for the global policy.
      **kwargs: `keras.Model` arguments (`name`, ...).

    Inputs: `{"encoder_tokens": int32 [batch, source_length],
    "decoder_tokens": int32 [batch, target_length]}`; id 0 is padding in
    the encoder tokens and the start id of the decoder tokens.
    Outputs: logits `[batch, target_length, vocab_size]`.

    Example:
    >>> model = T5("tiny", vocab_size=20, k=16, dropout_rate=0.0)
    >>> tokens = np.ones((2, 5), "int32")
    >>> model({"encoder_tokens": tokens, "decoder_tokens": tokens}).shape
    TensorShape([2, 5, 20])
    >>> model.generate(tokens, max_length=3).shape
    TensorShape([2, 3])

    References:
      - Raffel et al., Exploring the Limits of Transfer Learning with a
        Unified Text-to-Text Transformer, https://arxiv.org/abs/1910.10683
      - Li et al., The Lazy Neuron Phenomenon, https://arxiv.org/abs/2210.06313
    """

    def __init__(self, variant=None, vocab_size=32128, width=None, depth=None,
                 num_heads=None, mlp_dim=None, k=None, method="auto",
                 recall_target=0.95, implementation="auto",
                 dropout_rate=0.1, num_buckets=32, max_distance=128,
                 dtype=None, **kwargs):
        dims = resolve_variant(T5_VARIANTS, variant, "T5", width=width,
                               depth=depth, num_heads=num_heads,
                               mlp_dim=mlp_dim)

        # === Layers ===
        self.token_embedding = SharedEmbedding(
            vocab_size, dims["width"], reverse_scale=dims["width"] ** -0.5,
            name="token_embedding", dtype=dtype)
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout",
                                            dtype=dtype)
        stacks = {}
        for stack in ("encoder", "decoder"):
            decoder = stack == "decoder"
            position_bias = RelativePositionBias(
                dims["num_heads"], bidirectional=not decoder,
                num_buckets=num_buckets, max_distance=max_distance,
                name=f"{stack}_position_bias", dtype=dtype)
            blocks = [
                TransformerBlock(
                    num_heads=dims["num_heads"], mlp_dim=dims["mlp_dim"],
                    k=k, method=method, recall_target=recall_target,
                    implementation=implementation, dropout_rate=dropout_rate,
                    norm="rms", use_bias=False, causal=decoder,
                    cross_attention=decoder, name=f"{stack}_block_{i}",
                    dtype=dtype)
                for i in range(dims["depth"])]
            norm = keras.layers.RMSNormalization(
                epsilon=1e-6, name=f"{stack}_norm", dtype=dtype)
            stacks[stack] = (position_bias, blocks, norm)
        self.encoder_position_bias, self.encoder_blocks, self.encoder_norm = \
            stacks["encoder"]
        self.decoder_position_bias, self.decoder_blocks, self.decoder_norm = \
            stacks["decoder"]

        # === Functional model ===
        inputs = {
            "encoder_tokens": keras.Input((None,), dtype="int32",
                                          name="encoder_tokens"),
            "decoder_tokens": keras.Input((None,), dtype="int32",
                                          name="decoder_tokens"),
        }
        encoded = self._encode(inputs["encoder_tokens"])
        decoded = self._decode(inputs["decoder_tokens"], encoded,
                               inputs["encoder_tokens"])
        logits = self._logits(decoded)
        super().__init__(inputs=inputs, outputs=logits, dtype=dtype, **kwargs)

        # === Config ===
        self.variant = variant
        self.vocab_size = vocab_size
        self.width = dims["width"]
        self.depth = dims["depth"]
        self.num_heads = dims["num_heads"]
        self.mlp_dim = dims["mlp_dim"]
        self.k = k
        self.method = method
        self.recall_target = recall_target
        self.implementation = implementation
        self.dropout_rate = dropout_rate
        self.num_buckets = num_buckets
        self.max_distance = max_distance

    # These three serve both the functional graph (Keras tensors) and
    # `generate` (TensorFlow tensors): hence `keras.ops`, not `tf`.
    def _encode(self, tokens, training=None):
        padding_mask = keras.ops.not_equal(tokens, PAD_ID)
        x = self.dropout(self.token_embedding(tokens), training=training)
        bias = self.encoder_position_bias(x)
        for block in self.encoder_blocks:
            x = block(x, attention_bias=bias, padding_mask=padding_mask,
                      training=training)
        return self.dropout(self.encoder_norm(x), training=training)

    def _decode(self, tokens, encoded, encoder_tokens, training=None):
        context_mask = keras.ops.not_equal(encoder_tokens, PAD_ID)
        x = self.dropout(self.token_embedding(tokens), training=training)
        bias = self.decoder_position_bias(x)
        for block in self.decoder_blocks:
            x = block(x, context=encoded, attention_bias=bias,
                      context_padding_mask=context_mask, training=training)
        return self.dropout(self.decoder_norm(x), training=training)

    def _logits(self, decoded):
        # T5 v1.0 ties the output projection to the embedding and rescales
        # the decoder output by width^-0.5 first (`reverse_scale`).
        return self.token_embedding(decoded, reverse=True)

    def generate(self, encoder_tokens, max_length):
        """Greedy decoding of `max_length` tokens, with static shapes.

        Each step reruns the decoder over the whole `[batch, max_length]`
        buffer (no key/value cache): causal attention makes position `i`
        depend on earlier tokens only, and every shape stays fixed, so it
        runs eagerly, in `tf.function` and under `jit_compile=True`. There is
        no end-of-sequence stop: tokens after an end id are still decoded.

        Args:
          encoder_tokens: int `[batch, source_length]`, 0 is padding.
          max_length: int. Number of tokens to generate.

        Returns:
          int32 `[batch, max_length]`: the tokens after the start id.
        """
        if isinstance(max_length, bool) or not isinstance(max_length, int) \
                or max_length <= 0:
            raise ValueError(
                f"max_length must be a positive int, got {max_length!r}.")
        encoder_tokens = tf.convert_to_tensor(encoder_tokens, tf.int32)
        encoded = self._encode(encoder_tokens, training=False)
        batch = tf.shape(encoder_tokens)[0]
        positions = tf.range(max_length)[None, :]

        def step(i, tokens):
            decoder_tokens = tf.pad(tokens[:, :-1], [[0, 0], [1, 0]],
                                    constant_values=PAD_ID)
            decoded = self._decode(decoder_tokens, encoded, encoder_tokens,
                                   training=False)
            logits = self._logits(tf.gather(decoded, i, axis=1))
            best = tf.argmax(logits, axis=-1, output_type=tf.int32)
            return i + 1, tf.where(positions == i, best[:, None], tokens)

        tokens = tf.zeros([batch, max_length], tf.int32)
        _, tokens = tf.while_loop(
            lambda i, _: i < max_length, step, (tf.constant(0), tokens),
            maximum_iterations=max_length)
        return tokens

    def sparse_mlps(self):
        """Every `SparseMLP` by path, encoder then decoder in depth order:
        `{"encoder/block_<i>/mlp": layer, ..., "decoder/block_<i>/mlp": ...}`.
        The layer is named like its path with "_" for "/"."""
        return {f"{stack}/block_{i}/mlp": block.mlp
                for stack, blocks in (("encoder", self.encoder_blocks),
                                      ("decoder", self.decoder_blocks))
                for i, block in enumerate(blocks)}

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "variant": self.variant,
            "vocab_size": self.vocab_size,
            "width": self.width,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
            "k": self.k,
            "method": self.method,
            "recall_target": self.recall_target,
            "implementation": self.implementation,
            "dropout_rate": self.dropout_rate,
            "num_buckets": self.num_buckets,
            "max_distance": self.max_distance,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
