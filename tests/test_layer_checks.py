"""`check_layer` on the registered layers of the models (TopKActivation and
SparseMLP have theirs in test_layers.py)."""

import keras
import pytest

from tests.layer_checks import VOCAB_SIZE, check_layer
from topk_sparse.models.t5 import RelativePositionBias, SharedEmbedding
from topk_sparse.models.transformer import MultiHeadAttention, \
    TransformerBlock
from topk_sparse.models.vit import ClassToken, PositionEmbedding


def _attend(bias, query):
    """Mixes the query tokens by the position bias: a batch axis for the
    classifier head, and a gradient for the bias embedding."""
    return keras.ops.einsum("hqk,bkd->bhqd", bias[0], query)


# (layer, init kwargs, input shape, output shape, trainable weights,
#  check_layer keywords); inputs [batch, 5, 8] unless token ids.
LAYERS = {
    "class_token": (ClassToken, {}, (5, 8), (6, 8), 1, {}),
    "position_embedding": (PositionEmbedding, {}, (5, 8), (5, 8), 1, {}),
    # T5's decoder self-attention (causal, no biases): the four kernels.
    # The block below covers the ViT attention (biases, no mask).
    "attention": (MultiHeadAttention, {"num_heads": 2, "head_dim": 4,
                                       "use_bias": False, "causal": True},
                  (5, 8), (5, 8), 4, {}),
    # LayerNorm (2) + attention (8) + LayerNorm (2) + SparseMLP (4).
    "block": (TransformerBlock, {"num_heads": 2, "mlp_dim": 16, "k": 4},
              (5, 8), (5, 8), 16, {}),
    "relative_position_bias": (
        RelativePositionBias, {"num_heads": 2, "num_buckets": 8,
                               "max_distance": 16},
        (5, 8), (1, 2, 5, 5), 1, {"batched_output": False,
                                  "features": _attend}),
    "shared_embedding": (SharedEmbedding, {"vocab_size": VOCAB_SIZE,
                                           "width": 8},
                         (5,), (5, 8), 1, {"input_dtype": "int32"}),
}


@pytest.mark.parametrize("name", LAYERS)
def test_check_layer(name, tmp_path):
    layer_cls, kwargs, input_shape, output_shape, weights, options = \
        LAYERS[name]
    check_layer(layer_cls, kwargs, input_shape, output_shape, weights,
                tmp_path, **options)
