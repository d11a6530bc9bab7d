"""topk_sparse: Top-k sparse Transformer MLPs for TensorFlow / Keras 3.

Layers that keep, per token, only the `k` largest MLP activations
(*The Lazy Neuron Phenomenon*, arXiv 2210.06313), with TPU-KNN's
`approx_max_k` (arXiv 2206.14286) on TPU.
"""

from topk_sparse import distribute, ops, scoring
# Register ViT, T5, their layers and the learning-rate schedules with Keras
# (a trainer's model.keras loads after `import topk_sparse`), and the models
# with the trainer.
from topk_sparse import models, optimizers
from topk_sparse.callbacks import CalibrationCallback, SparsityCallback
from topk_sparse.calibration import (BrierScore, ExpectedCalibrationError,
                                     NegativeLogLikelihood)
from topk_sparse.layers import SparseMLP, TopKActivation
from topk_sparse.sparsity import NonzeroFraction

__version__ = "0.1.0"

__all__ = [
    "NonzeroFraction", "BrierScore", "CalibrationCallback",
    "ExpectedCalibrationError", "NegativeLogLikelihood", "SparseMLP",
    "SparsityCallback", "TopKActivation", "distribute", "models", "ops",
    "optimizers", "scoring",
]
