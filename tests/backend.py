"""What the backend-neutral tests need from the backend Keras runs on.

Compiling a function (eager, traced, XLA), its gradient, a layer called
under a compiler, and the two-device data-parallel scope: TensorFlow's
`tf.function` / `GradientTape` / MirroredStrategy, or JAX's `jax.jit` /
`jax.grad` / `keras.distribution.DataParallel`. Test modules listed in
`conftest.BACKEND_NEUTRAL` use only this, numpy and `keras.ops`.
"""

import contextlib

import keras
import numpy as np

BACKEND = keras.config.backend()

JAX_XLA_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
                 "--xla_cpu_collective_call_terminate_timeout_seconds=900")
"""XLA flags of the JAX processes of the tests. Two logical CPU devices'
threads share the cores with the other tests: a collective's rendezvous
may wait longer than XLA's default 40 s, after which XLA aborts the process
(seen in CI, under a loaded machine)."""

MODES = ("eager", "function", "jit")
"""How a function runs: eagerly, traced (`tf.function`; `jax.jit`) or
compiled by XLA (`tf.function(jit_compile=True)`; `jax.jit`)."""


def _has_float64():
    if BACKEND != "jax":
        return True
    import jax
    return bool(jax.config.jax_enable_x64)


FLOAT_DTYPES = ("float16", "bfloat16", "float32") + (
    ("float64",) if _has_float64() else ())
"""The float dtypes this backend computes in (JAX without x64 has no
float64)."""


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def normal(shape, seed, dtype="float32"):
    """Standard normal numpy values, the same on every backend."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def compiled(f, mode):
    """`f` run as `mode` says (one of `MODES`)."""
    if mode == "eager":
        return f
    if BACKEND == "jax":
        import jax
        return jax.jit(f)
    import tensorflow as tf
    return tf.function(f, jit_compile=mode == "jit")


def compiled_with_state(f, variables, mode):
    """`f` (which reads and assigns Keras `variables`: metric updates) run
    as `mode` says. Under `jax.jit` the variables' values go into the trace
    and their updates come out of it (`topk_sparse.backend.jax.jit_over`,
    as Keras's own JAX trainer does), and are assigned after the call."""
    if mode == "eager" or BACKEND != "jax":
        return compiled(f, mode)
    from topk_sparse.backend.jax import jit_over
    return jit_over(f, variables)


def compiled_call(layer, mode):
    """`x -> layer(x)` of a built layer, run as `mode` says, its weights
    and metrics updated as an eager call would."""
    return compiled_with_state(
        layer, [*layer.variables, *layer.metrics_variables], mode)


def with_unknown_dims(f, shape):
    """`f` traced for inputs of `shape`, where None is a size unknown while
    tracing (TensorFlow); JAX traces every call with its static shape.
    A layer is called as `compiled_call` calls it."""
    if BACKEND == "jax":
        if isinstance(f, keras.layers.Layer):
            return compiled_call(f, "function")
        return compiled(f, "function")
    import tensorflow as tf
    return tf.function(f, input_signature=[tf.TensorSpec(shape)])


def value_and_grad(f):
    """`x -> (f(x), d f(x)[0] / dx)` for `f` returning a tuple whose first
    entry is the loss (a scalar); `x` an array or a list of them."""
    if BACKEND == "jax":
        import jax

        def loss_and_outputs(x):
            out = f(x)
            return out[0], out

        def run(x):
            (_, out), grad = jax.value_and_grad(
                loss_and_outputs, has_aux=True)(x)
            return out, grad
        return run
    import tensorflow as tf

    def run(x):
        x = tf.nest.map_structure(tf.convert_to_tensor, x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = f(x)
        return out, tape.gradient(out[0], x)
    return run


@contextlib.contextmanager
def data_parallel():
    """Data parallelism over two devices (logical CPUs here): build and fit
    a model inside."""
    if BACKEND == "jax":
        import jax
        with keras.distribution.DataParallel(
                devices=jax.devices()[:2]).scope():
            yield
        return
    from tests.devices import mirrored_strategy
    with mirrored_strategy().scope():
        yield
