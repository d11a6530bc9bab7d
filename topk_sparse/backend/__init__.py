"""What only a backend can do, for the backend Keras runs on.

Everything else in the package is written once in `keras.ops`. The module
of the running backend (`keras.config.backend()`) provides:

- `approx_max_k(x, k, recall_target)`: TPU-KNN's op, `(values, indices)`
  of the approximate top-k of each row (XLA's `ApproxTopK`; approximate on
  TPU only);
- `on_tpu()`: whether this process computes on TPU devices;
- `compiled_by_xla()`: whether the code being traced now will be compiled
  by XLA (always on JAX; under `jit_compile=True` on TensorFlow);
- `has_value(variable)`: whether a Keras variable can be read where the
  code runs (not, on JAX, inside a compiled `fit` step that did not pass
  it in);
- `sampling_seed(pair)` and `sample(logits, seed, step)`: stateless
  sampling of one token per row (`T5.generate`);
- `while_loop(cond, body, loop_vars, maximum_iterations, model)`: the
  decoding loop of `T5.generate`, the metric counts of `model`'s layers
  updated inside it (on JAX carried through the loop);
- `compiled(fn, model)`: `fn`, which calls `model`, compiled (a
  `tf.function`; `jax.jit` over the model's variables), the variables it
  updates updated as an eager call would;
- `static_value(x)`: `x` as numpy where its value is known, else None.
"""

import keras

if keras.config.backend() == "jax":
    from topk_sparse.backend.jax import (
        approx_max_k, compiled, compiled_by_xla, has_value, on_tpu, sample,
        sampling_seed, static_value, while_loop)
elif keras.config.backend() == "tensorflow":
    from topk_sparse.backend.tensorflow import (
        approx_max_k, compiled, compiled_by_xla, has_value, on_tpu, sample,
        sampling_seed, static_value, while_loop)
else:
    raise ImportError(
        f"topk_sparse runs on the TensorFlow and the JAX backends of Keras, "
        f"not {keras.config.backend()!r}: set KERAS_BACKEND=tensorflow or "
        f"KERAS_BACKEND=jax.")

__all__ = ["approx_max_k", "compiled", "compiled_by_xla", "has_value",
           "on_tpu", "sample", "sampling_seed", "static_value", "while_loop"]
