"""Vision Transformer (arXiv 2010.11929) with Top-k sparse MLPs.

Patches -> linear embedding (a strided Conv2D) -> [class token] -> learned
position embeddings -> `depth` pre-norm blocks -> LayerNorm -> class token
or global average pool -> linear head. The MLPs are ReLU (the Lazy Neuron
paper's ViT, arXiv 2210.06313) rather than the original GELU, so that
`k=None` is the paper's dense baseline and `k=256` its Top-k ViT-B/16.
"""

import keras
from keras import ops

from topk_sparse import registry
from topk_sparse.models.common import (ArgumentsConfig, k_config,
                                       k_per_mlp, resolve_variant)
from topk_sparse.models.transformer import TransformerBlock

# ViT-B and ViT-L: Dosovitskiy et al., arXiv 2010.11929, Table 1 ("Hidden
# size D", "Layers", "Heads", "MLP size"). Ti and S come from Steiner et al.,
# How to train your ViT, arXiv 2106.10270 (and DeiT, arXiv 2012.12877): the
# original paper has no models below Base. "micro" and "tiny" are CPU-sized
# for tests and demos, not from any paper.
VIT_VARIANTS = {
    "Ti/16": dict(width=192, depth=12, num_heads=3, mlp_dim=768,
                  patch_size=16),
    "S/16": dict(width=384, depth=12, num_heads=6, mlp_dim=1536,
                 patch_size=16),
    "B/16": dict(width=768, depth=12, num_heads=12, mlp_dim=3072,
                 patch_size=16),
    "L/16": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096,
                 patch_size=16),
    "micro": dict(width=32, depth=2, num_heads=2, mlp_dim=128, patch_size=4),
    "tiny": dict(width=64, depth=4, num_heads=4, mlp_dim=256, patch_size=4),
}

POOLINGS = ("cls", "gap")


@keras.saving.register_keras_serializable(package="topk_sparse")
class ClassToken(keras.layers.Layer):
    """Prepends one learned token to a `[batch, tokens, width]` sequence."""

    def build(self, input_shape):
        self.token = self.add_weight(
            name="token", shape=(1, 1, input_shape[-1]), initializer="zeros")

    def call(self, inputs):
        token = ops.cast(self.token, inputs.dtype)
        token = ops.broadcast_to(
            token, (ops.shape(inputs)[0], 1, ops.shape(inputs)[2]))
        return ops.concatenate([token, inputs], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], length, input_shape[2])


@keras.saving.register_keras_serializable(package="topk_sparse")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding per position to `[batch, tokens, width]`."""

    def build(self, input_shape):
        if input_shape[1] is None:
            raise ValueError(
                f"PositionEmbedding {self.name!r} needs a static sequence "
                f"length, got input shape {input_shape}.")
        self.embedding = self.add_weight(
            name="embedding", shape=tuple(input_shape[1:]),
            initializer=keras.initializers.RandomNormal(stddev=0.02))

    def call(self, inputs):
        return inputs + ops.cast(self.embedding, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="topk_sparse")
class ViT(ArgumentsConfig, keras.Model):
    """Vision Transformer classifier whose MLPs keep the top `k` activations.

    A functional model, built when made: its MLPs and their sparsity metrics
    exist right away (so it can be made inside a `tf.distribute` scope).

    Args:
      variant: str or None. A key of `VIT_VARIANTS` ("Ti/16", "S/16", "B/16",
        "L/16", "micro", "tiny"), or None to give every dimension below.
      image_size: int. Height and width of the (square) input images.
        Defaults to 224.
      num_classes: int. Number of output logits. Defaults to 1000.
      patch_size: int. Patch side; must divide `image_size`. Overrides the
        variant's.
      width: int. Token width (`D`). Overrides the variant's.
      depth: int. Number of blocks. Overrides the variant's.
      num_heads: int. Attention heads. Overrides the variant's.
      mlp_dim: int. MLP hidden width. Overrides the variant's.
      channels: int. Input image channels. Defaults to 3.
      k: int or None: MLP activations kept per token, in every MLP; None is
        the dense ReLU ViT. Or one per MLP: a list in layer order, or a
        mapping by MLP name (`sparse_mlps()`), None for a dense one
        (`topk_sparse.models.common.k_per_mlp`). Defaults to None.
      method: str. Top-k method, see `topk_sparse.TopKActivation`.
      recall_target: float in (0, 1]. Expected recall of `"approx"`.
      implementation: str. `SparseMLP` path: `"masked"`, `"gather"` or
        `"auto"` (default: gathers in calls of few tokens, see `SparseMLP`).
      pooling: str. `"cls"` (class token) or `"gap"` (global average pool of
        the patch tokens). Defaults to "cls".
      dropout_rate: float in [0, 1). Dropout after the position embeddings
        and on every residual branch. Defaults to 0.
      dtype: dtype policy of every layer, or None for the global policy.
      **kwargs: `keras.Model` arguments (`name`, ...).

    Inputs: float images `[batch, image_size, image_size, channels]`.
    Outputs: logits `[batch, num_classes]`.

    Example:
    >>> model = ViT("micro", image_size=16, num_classes=10, k=8)
    >>> tuple(model(np.zeros((2, 16, 16, 3), "float32")).shape)
    (2, 10)
    >>> list(model.sparse_mlps())
    ['encoder_block_0_mlp', 'encoder_block_1_mlp']

    References:
      - Dosovitskiy et al., An Image is Worth 16x16 Words,
        https://arxiv.org/abs/2010.11929
      - Li et al., The Lazy Neuron Phenomenon, https://arxiv.org/abs/2210.06313
    """

    def __init__(self, variant=None, image_size=224, num_classes=1000,
                 patch_size=None, width=None, depth=None, num_heads=None,
                 mlp_dim=None, channels=3, k=None, method="auto",
                 recall_target=0.95, implementation="auto", pooling="cls",
                 dropout_rate=0.0, dtype=None, **kwargs):
        dims = resolve_variant(
            VIT_VARIANTS, variant, "ViT", width=width, depth=depth,
            num_heads=num_heads, mlp_dim=mlp_dim, patch_size=patch_size)
        if pooling not in POOLINGS:
            raise ValueError(
                f"Unknown pooling {pooling!r}: choose one of {POOLINGS}.")
        if image_size % dims["patch_size"]:
            raise ValueError(
                f"image_size={image_size} is not divisible by "
                f"patch_size={dims['patch_size']}.")
        grid = image_size // dims["patch_size"]

        # === Layers ===
        self.patch_embedding = keras.layers.Conv2D(
            dims["width"], dims["patch_size"], strides=dims["patch_size"],
            name="patch_embedding", dtype=dtype)
        self.class_token = (ClassToken(name="class_token", dtype=dtype)
                            if pooling == "cls" else None)
        self.position_embedding = PositionEmbedding(
            name="position_embedding", dtype=dtype)
        self.dropout = keras.layers.Dropout(dropout_rate, name="dropout",
                                            dtype=dtype)
        names = [f"encoder_block_{i}" for i in range(dims["depth"])]
        self.blocks = [
            TransformerBlock(
                num_heads=dims["num_heads"], mlp_dim=dims["mlp_dim"],
                k=block_k, method=method, recall_target=recall_target,
                implementation=implementation, dropout_rate=dropout_rate,
                name=name, dtype=dtype)
            for name, block_k in zip(names, k_per_mlp(k, {
                f"{name}_mlp": dims["mlp_dim"] for name in names}).values())]
        self.encoder_norm = keras.layers.LayerNormalization(
            epsilon=1e-6, name="encoder_norm", dtype=dtype)
        self.head = keras.layers.Dense(num_classes, name="head", dtype=dtype)

        # === Functional model ===
        images = keras.Input((image_size, image_size, channels),
                             name="images")
        x = self.patch_embedding(images)
        x = keras.ops.reshape(x, (-1, grid * grid, dims["width"]))
        if self.class_token is not None:
            x = self.class_token(x)
        x = self.dropout(self.position_embedding(x))
        for block in self.blocks:
            x = block(x)
        x = self.encoder_norm(x)
        x = x[:, 0] if pooling == "cls" else keras.ops.mean(x, axis=1)
        logits = self.head(x)
        super().__init__(inputs=images, outputs=logits, dtype=dtype, **kwargs)

        # === Config ===
        self._keep_arguments(
            variant=variant, image_size=image_size, num_classes=num_classes,
            **dims, channels=channels, k=k_config(k), method=method,
            recall_target=recall_target, implementation=implementation,
            pooling=pooling, dropout_rate=dropout_rate)

    def sparse_mlps(self):
        """Every `SparseMLP` by name, `{"encoder_block_<i>_mlp": layer}`, in
        depth order: the name of its `fit` log keys, TensorBoard tags and
        report entries."""
        return {block.mlp.name: block.mlp for block in self.blocks}


def _from_data(kwargs, data):
    """A ViT sized by its data: `(images, labels)` batches."""
    _, height, _, channels = data.element_spec[0].shape
    return ViT(**kwargs, image_size=height, channels=channels,
               num_classes=data.features["num_classes"])


registry.register_model(
    "vit", build=_from_data, metrics=registry.classifier_metrics,
    evaluators=("calibration", "corruptions", "cifar10_corrupted",
                "two_stage", "allocation"))
