"""ViT and T5 built from one Transformer block with a Top-k sparse MLP.

`model.sparse_mlps()` names every MLP by its layer name:
`"encoder_block_<i>_mlp"` (ViT, T5 encoder) and `"decoder_block_<i>_mlp"`
(T5 decoder), the name of its `fit` log key
(`encoder_block_<i>_mlp/nonzero_fraction`), TensorBoard tags and report
entries. The models depend on the layers and the vocabulary's ids only
(never on `topk_sparse.data`); each registers itself with the trainer
(`topk_sparse.registry`: `"vit"`, `"t5"`) in its own module.
"""

from topk_sparse.models.t5 import (MAX_GENERATE_LENGTH, T5, T5_VARIANTS,
                                   RelativePositionBias, SharedEmbedding,
                                   relative_position_bucket)
from topk_sparse.models.transformer import MultiHeadAttention, TransformerBlock
from topk_sparse.models.vit import (VIT_VARIANTS, ClassToken,
                                    PositionEmbedding, ViT)

__all__ = [
    "ClassToken",
    "MAX_GENERATE_LENGTH",
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
