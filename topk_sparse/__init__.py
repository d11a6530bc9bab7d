"""topk_sparse: Top-k sparse Transformer MLPs for Keras 3 (TensorFlow, JAX).

Layers that keep, per token, only the `k` largest MLP activations
(*The Lazy Neuron Phenomenon*, arXiv 2210.06313), with TPU-KNN's
`approx_max_k` (arXiv 2206.14286) on TPU.

The layers, metrics and models import with Keras and either backend alone;
what needs TensorFlow (the callbacks writing TensorBoard, `tf.distribute`)
is imported when first used (`topk_sparse.SparsityCallback`, ...).
"""

import importlib

# Register ViT, T5, their layers and the learning-rate schedules with Keras
# (a trainer's model.keras loads after `import topk_sparse`).
from topk_sparse import allocation, models, ops, optimizers, scoring
from topk_sparse.calibration import (BrierScore, ExpectedCalibrationError,
                                     NegativeLogLikelihood)
from topk_sparse.layers import SparseMLP, TopKActivation
from topk_sparse.sparsity import NonzeroFraction

__version__ = "0.1.0"

# Names that import TensorFlow: their modules load on first use.
_LATER = {
    "CalibrationCallback": "topk_sparse.callbacks",
    "SparsityCallback": "topk_sparse.callbacks",
    **{module: f"topk_sparse.{module}" for module in (
        "callbacks", "checkpoint", "data", "distribute", "evaluation",
        "robustness", "study", "training")},
}


def __getattr__(name):
    """Imports the modules in `_LATER` on first use."""
    if name not in _LATER:
        raise AttributeError(
            f"module 'topk_sparse' has no attribute {name!r}")
    try:
        module = importlib.import_module(_LATER[name])
    except ImportError as error:
        if "tensorflow" not in str(error):
            raise
        raise ImportError(
            f"topk_sparse.{name} needs TensorFlow, which is not installed: "
            f"pip install 'topk_sparse[cpu]' (or [gpu], [tpu]).") from error
    return module if module.__name__.endswith(name) else getattr(module,
                                                                 name)


__all__ = [
    "NonzeroFraction", "BrierScore", "allocation", "CalibrationCallback",
    "ExpectedCalibrationError", "NegativeLogLikelihood", "SparseMLP",
    "SparsityCallback", "TopKActivation", "distribute", "models", "ops",
    "optimizers", "scoring",
]
