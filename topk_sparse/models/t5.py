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
from keras import ops
import numpy as np

from topk_sparse import backend, checks, registry
from topk_sparse.models import sampling
from topk_sparse.models.common import (ArgumentsConfig, k_config,
                                       k_per_mlp, resolve_variant)
from topk_sparse.models.transformer import TransformerBlock
from topk_sparse.vocabulary import DECODER_START_ID, PAD_ID
"""Padding in the encoder tokens, and the decoder's start id (T5's)."""

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


MAX_GENERATE_LENGTH = 4096
"""Most tokens `T5.generate` decodes per call. Its key/value caches are
sized by `max_length` and every step reads them whole and rewrites them
(static shapes): at 4096 tokens T5-Base's hold 302 MB per sequence in
float32, read twice and written once per step, beside the 495 MB of weights
a step reads. Longer requests raise rather than exhaust memory or crawl."""


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
    n = -ops.cast(relative_position, "int32")  # query - key
    bucket = ops.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket += ops.cast(n < 0, "int32") * num_buckets
        n = ops.abs(n)
    else:
        n = ops.maximum(n, 0)
    max_exact = num_buckets // 2
    # log(n / max_exact) is only used where n >= max_exact; the maximum
    # keeps it finite elsewhere.
    scaled = ops.log(
        ops.cast(ops.maximum(n, max_exact), "float32") / max_exact
    ) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = ops.minimum(max_exact + ops.cast(scaled, "int32"),
                        num_buckets - 1)
    return bucket + ops.where(n < max_exact, n, large)


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
        q_len, kv_len = ops.shape(query)[1], ops.shape(key)[1]
        return self._bias(ops.arange(kv_len)[None, :]
                          - ops.arange(q_len)[:, None])

    def bias_at(self, position, kv_len):
        """The bias of one query at `position` (int scalar, may be a
        tensor) over the keys `0 .. kv_len - 1`: `[1, num_heads, 1,
        kv_len]`, row `position` of what `call` gives. For incremental
        decoding, one position per step."""
        return self._bias(ops.arange(kv_len)[None, :] - position)

    def _bias(self, relative):
        buckets = relative_position_bucket(
            relative, self.bidirectional, self.num_buckets, self.max_distance)
        bias = ops.take(ops.cast(self.embedding, self.compute_dtype),
                        buckets, axis=0)
        return ops.transpose(bias, (2, 0, 1))[None]

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
        embedding = ops.cast(self.embedding, self.compute_dtype)
        if reverse:
            # Scaled here, not by the caller: in Keras 3.15 a Keras tensor
            # times a Python float is marked sparse and breaks the graph.
            return ops.matmul(inputs * self.reverse_scale,
                              ops.transpose(embedding))
        return ops.take(embedding, ops.cast(inputs, "int32"), axis=0)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "width": self.width, "reverse_scale": self.reverse_scale}


@keras.saving.register_keras_serializable(package="topk_sparse")
class T5(ArgumentsConfig, keras.Model):
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
      k: int or None: MLP activations kept per token, in every MLP; None is
        the dense T5. Or one per MLP: a list in layer order (encoder, then
        decoder), or a mapping by MLP name (`sparse_mlps()`), None for a
        dense one (`topk_sparse.models.common.k_per_mlp`). Defaults to None.
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
    >>> tuple(model({"encoder_tokens": tokens,
    ...              "decoder_tokens": tokens}).shape)
    (2, 5, 20)
    >>> tuple(model.generate(tokens, max_length=3).shape)
    (2, 3)

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
        names = {stack: [f"{stack}_block_{i}" for i in range(dims["depth"])]
                 for stack in ("encoder", "decoder")}
        ks = iter(k_per_mlp(k, {f"{name}_mlp": dims["mlp_dim"]
                                for stack in names.values()
                                for name in stack}).values())
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
                    k=next(ks), method=method, recall_target=recall_target,
                    implementation=implementation, dropout_rate=dropout_rate,
                    norm="rms", use_bias=False, causal=decoder,
                    cross_attention=decoder, name=name, dtype=dtype)
                for name in names[stack]]
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
        self._keep_arguments(
            variant=variant, vocab_size=vocab_size, **dims, k=k_config(k),
            method=method, recall_target=recall_target,
            implementation=implementation, dropout_rate=dropout_rate,
            num_buckets=num_buckets, max_distance=max_distance)

    # These three serve both the functional graph (Keras tensors) and
    # `generate` (backend tensors).
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

    def generate(self, encoder_tokens, max_length, eos_id=None,
                 temperature=0.0, top_k=0, top_p=1.0, seed=None,
                 use_cache=True):
        """Decodes up to `max_length` tokens per sequence, with static shapes.

        Greedy by default; samples when `temperature > 0`. Runs on both
        backends: eagerly, in `tf.function` and under `jit_compile=True`
        (XLA, TPU) on TensorFlow; eagerly and inside `jax.jit` (in a
        `keras.StatelessScope` over the model's variables, as keras-hub's
        `CausalLM` does) on JAX; and under a mixed precision policy. Greedy
        tokens are the same on both backends. The decoder MLPs' sparsity
        metrics count the decoded tokens (on JAX, their counts are carried
        through the loop).

        With `use_cache=True` (default), each step runs the decoder on one
        token per sequence. Each decoder block keeps its self-attention
        keys and values in a cache of `[batch, heads, max_length,
        head_dim]` (zeros until written): step `i` writes its token's at
        position `i` with a one-hot select, attends to positions `<= i`
        only and adds the relative position bias of query `i` only
        (`RelativePositionBias.bias_at`); the cross-attention keys and
        values of the encoder output are computed once. Every decoder MLP
        thus sees `[batch, 1, width]`, so Top-k MLPs take the gathered path
        (and two-stage scoring, where calibrated) by their
        `implementation="auto"` rule, whenever `batch` is static (eager
        calls, JAX, or `tf.function` traced on a shape). With
        `use_cache=False`, each step reruns the decoder over the whole `[batch, max_length]`
        buffer: the reference the cache is tested against.

        Cost and bound: each step attends over, and rewrites, its whole
        fixed-size cache, so a step costs O(`max_length`) there and the
        caches hold `2 * depth * batch * max_length * width` values
        (T5-Base, batch 1, 512 tokens: 38 MB in float32). Hence
        `max_length <= MAX_GENERATE_LENGTH`: longer requests raise instead
        of exhausting memory or crawling.

        Args:
          encoder_tokens: int `[batch, source_length]`, 0 is padding; ids
            in `[0, vocab_size)` (checked where their values are known:
            numpy and eager inputs, not traced ones).
          max_length: int in `[1, MAX_GENERATE_LENGTH]`. Tokens to
            generate (fewer are decoded when every row stops at `eos_id`).
          eos_id: int or None. End-of-sequence id: a row that emits it
            stops (the id is kept) and is padded with 0 after it; decoding
            ends when every row has stopped. None (default) always decodes
            `max_length` tokens.
          temperature: float >= 0. 0 (default) is greedy (the argmax, which
            sampling tends to as the temperature goes to 0, whatever
            `top_k` and `top_p`); otherwise tokens are sampled from
            `softmax(logits / temperature)`, filtered by `top_k`, `top_p`.
          top_k: int in `[0, vocab_size]`. Sample among the `top_k` most
            likely tokens only (ties at the cutoff kept); 0 (default) keeps
            all.
          top_p: float in (0, 1]. Nucleus sampling: among the most likely
            tokens whose probabilities (after `top_k`) first reach `top_p`;
            1 (default) keeps all.
          seed: None, an int or a pair of ints. Seeds stateless sampling,
            folded with the step index: one seed, one output (eagerly and
            traced alike, per backend; XLA's sampler on TensorFlow and
            JAX's draw other tokens). None draws a new seed per call (on
            JAX, per Python call: inside `jax.jit`, pass a seed).
          use_cache: bool. Decode with the key/value cache (default), or
            rerun the decoder over the whole buffer every step.

        Returns:
          int32 `[batch, max_length]`: the tokens after the start id.

        Raises:
          ValueError: for an argument outside the ranges above, float
            tokens or token ids outside `[0, vocab_size)`.
        """
        max_length = checks.positive_int(max_length, "max_length",
                                         upper=MAX_GENERATE_LENGTH)
        if eos_id is not None:
            eos_id = checks.int_in_range(eos_id, "eos_id", 0,
                                         self.vocab_size - 1)
        choose = sampling.token_chooser(temperature, top_k, top_p, seed,
                                        self.vocab_size)
        encoder_tokens = self._token_ids(encoder_tokens)
        encoded = self._encode(encoder_tokens, training=False)
        context_mask = ops.not_equal(encoder_tokens, PAD_ID)
        batch = ops.shape(encoder_tokens)[0]
        project = self._output_projection(encoder_tokens.shape[0])
        positions = ops.arange(max_length)

        if use_cache:
            caches = self._decoding_caches(encoded, batch, max_length)

            def next_logits(i, tokens, last, caches):
                return self._decode_step(last, i, caches, context_mask,
                                         max_length, project)
        else:
            caches = ()

            def next_logits(i, tokens, last, caches):
                decoder_tokens = ops.pad(tokens[:, :-1], [[0, 0], [1, 0]],
                                         constant_values=PAD_ID)
                decoded = self._decode(decoder_tokens, encoded,
                                       encoder_tokens, training=False)
                return project(ops.take(decoded, i, axis=1)), caches

        def step(i, tokens, last, done, caches):
            logits, caches = next_logits(i, tokens, last, caches)
            token = ops.where(done, PAD_ID, choose(logits, i))
            tokens = ops.where(positions == i, token[:, None], tokens)
            if eos_id is not None:
                done = ops.logical_or(done, ops.equal(token, eos_id))
            return i + 1, tokens, token, done, caches

        def running(i, tokens, last, done, caches):
            if eos_id is None:
                return i < max_length
            return ops.logical_and(i < max_length,
                                   ops.logical_not(ops.all(done)))

        start = ops.full((batch,), DECODER_START_ID, "int32")
        _, tokens, *_ = backend.while_loop(
            running, step,
            (ops.convert_to_tensor(0, "int32"),
             ops.zeros((batch, max_length), "int32"), start,
             ops.zeros((batch,), "bool"), caches),
            max_length, self)
        return tokens

    def _token_ids(self, tokens):
        """`tokens` as int32 `[batch, source_length]`, after one-line
        checks: integer dtype, and ids in `[0, vocab_size)` where their
        values are known. (A gather with an id past the table clamps on
        JAX and fails unreadably on TensorFlow.)"""
        if not ops.is_tensor(tokens):
            tokens = np.asarray(tokens)
        dtype = keras.backend.standardize_dtype(tokens.dtype)
        if "int" not in dtype:
            raise ValueError(
                f"encoder_tokens must be integer token ids, got dtype "
                f"{dtype}: cast them to int32.")
        if tokens.ndim != 2:  # None: a TensorFlow tensor of unknown rank
            raise ValueError(
                f"encoder_tokens must be [batch, source_length], got shape "
                f"{tokens.shape}.")
        values = tokens if isinstance(tokens, np.ndarray) \
            else backend.static_value(tokens)
        if values is not None and values.size and (
                values.min() < 0 or values.max() >= self.vocab_size):
            raise ValueError(
                f"encoder_tokens hold ids outside [0, {self.vocab_size}) "
                f"(the vocab_size): min {values.min()}, max "
                f"{values.max()}.")
        return ops.cast(tokens, "int32")

    def _output_projection(self, batch):
        """`project(decoded [batch, width]) -> logits [batch, vocab]`, the
        tied output projection of `generate`, for a static `batch` (None if
        unknown). From batch 2 on it multiplies by a transposed copy of the
        embedding, made once per call: measured on this CPU with T5-Base's
        32128 x 768 embedding, a few rows times the embedding transposed
        inside the matmul (`transpose_b`) ran 2-10x slower (XLA, batch 4:
        90-200 ms against 11-17 ms). At batch 1 that matmul is a fast
        matrix-vector product and the copy (40-70 ms under XLA) costs more
        than it saves."""
        embedding = self.token_embedding
        kernel = ops.cast(embedding.embedding, embedding.compute_dtype)
        scale = embedding.reverse_scale
        if batch == 1:
            return lambda decoded: ops.einsum("bd,vd->bv", decoded * scale,
                                              kernel)
        kernel = ops.transpose(kernel)
        return lambda decoded: ops.matmul(decoded * scale, kernel)

    def _decoding_caches(self, encoded, batch, max_length):
        """Per decoder block: `(self-attention cache, cross-attention keys
        and values)`, the cache zeroed, see `TransformerBlock.decode`."""
        zeros = ops.zeros(
            (batch, self.num_heads, max_length, self.width // self.num_heads),
            self.token_embedding.compute_dtype)
        return [((zeros, zeros), block.context_keys_and_values(encoded))
                for block in self.decoder_blocks]

    def _decode_step(self, tokens, position, caches, context_mask,
                     max_length, project):
        """Logits `[batch, vocab]` of the position after `tokens`
        (`[batch]`, at `position`) and the caches with it written."""
        x = self.token_embedding(tokens[:, None])
        bias = self.decoder_position_bias.bias_at(position, max_length)
        positions = ops.arange(max_length)
        write, written = positions == position, positions <= position
        updated = []
        for block, (cache, context) in zip(self.decoder_blocks, caches):
            x, cache = block.decode(x, cache, write, written, bias, context,
                                    context_mask)
            updated.append((cache, context))
        decoded = self.decoder_norm(x)[:, 0]
        return project(decoded), updated

    def sparse_mlps(self):
        """Every `SparseMLP` by name, encoder then decoder in depth order:
        `{"encoder_block_<i>_mlp": layer, ..., "decoder_block_<i>_mlp":
        ...}`: the name of its `fit` log keys, TensorBoard tags and report
        entries."""
        return {block.mlp.name: block.mlp
                for block in (*self.encoder_blocks, *self.decoder_blocks)}


registry.register_model(
    "t5", metrics=registry.token_metrics,
    build=lambda kwargs, data: T5(
        **kwargs, vocab_size=data.features["vocab_size"]),
    evaluators=("exact_match", "two_stage", "allocation"))
