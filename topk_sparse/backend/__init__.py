"""What only a backend can do, for the backend Keras runs on.

Everything else in the package is written once in `keras.ops`. The module
of the running backend (`keras.config.backend()`) provides:

- `approx_max_k(x, k, recall_target)`: TPU-KNN's op, `(values, indices)`
  of the approximate top-k of each row (XLA's `ApproxTopK`; approximate on
  TPU only);
- `on_tpu()`: whether this process computes on TPU devices;
- `compiled_by_xla()`: whether the code being traced now will be compiled
  by XLA (always on JAX; under `jit_compile=True` on TensorFlow).
"""

import keras

if keras.config.backend() == "jax":
    from topk_sparse.backend.jax import approx_max_k, compiled_by_xla, on_tpu
elif keras.config.backend() == "tensorflow":
    from topk_sparse.backend.tensorflow import (approx_max_k,
                                                compiled_by_xla, on_tpu)
else:
    raise ImportError(
        f"topk_sparse runs on the TensorFlow and the JAX backends of Keras, "
        f"not {keras.config.backend()!r}: set KERAS_BACKEND=tensorflow or "
        f"KERAS_BACKEND=jax.")

__all__ = ["approx_max_k", "compiled_by_xla", "on_tpu"]
