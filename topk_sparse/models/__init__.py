"""ViT and T5 built from one Transformer block with a Top-k sparse MLP.

`model.sparse_mlps()` names every MLP by path: `"encoder/block_<i>/mlp"`
(ViT, T5 encoder) and `"decoder/block_<i>/mlp"` (T5 decoder). The layer
itself is named like the path with "_" for "/" (Keras layer names cannot
hold "/"), so its `fit` log key is `encoder_block_<i>_mlp/nonzero_fraction`.
"""

from topk_sparse.models.t5 import (T5, T5_VARIANTS, RelativePositionBias,
                                   SharedEmbedding, relative_position_bucket)
from topk_sparse.models.transformer import MultiHeadAttention, TransformerBlock
from topk_sparse.models.vit import (VIT_VARIANTS, ClassToken,
                                    PositionEmbedding, ViT)

__all__ = [
    "ClassToken",
    "MultiHeadAttention",
    "PositionEmbedding",
    "RelativePositionBias",
    "SharedEmbedding",
    "T5",
    "T5_VARIANTS",
    "TransformerBlock",
    "VIT_VARIANTS",
    "ViT",
    "relative_position_bucket",
]
