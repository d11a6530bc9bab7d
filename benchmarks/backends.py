"""How the benchmarks compile a case on the Keras backend they run on.

`KERAS_BACKEND` picks it. TensorFlow's modes are `tf.function` and
`jit_compile` (XLA); JAX has one, `jax.jit`. A case's layers are called
with their variables passed in (JAX: as jitted arguments inside a
`keras.StatelessScope`, not as constants baked into the program), as a
trainer or a server calls them.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

BACKEND = keras.config.backend()
MODES = ("tf.function", "jit_compile") if BACKEND == "tensorflow" \
    else ("jax.jit",)
if BACKEND == "tensorflow":
    import tensorflow as tf
    VERSION = tf.__version__
    # Each case is its own tf.function by design: no retracing warning.
    tf.get_logger().setLevel("ERROR")
else:
    import jax
    VERSION = jax.__version__


def json_path(name):
    """The default JSON a benchmark writes: `benchmarks/<name>.json` on
    TensorFlow, `benchmarks/<name>_jax.json` on JAX."""
    suffix = "" if BACKEND == "tensorflow" else f"_{BACKEND}"
    return f"benchmarks/{name}{suffix}.json"


def cpu():
    """The CPU's model name and widest vector unit (`/proc/cpuinfo`):
    hosts of one machine kind differ there, and the ratios with them."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")
    vector = "AVX-512" if " avx512f" in info else (
        "AVX2" if " avx2" in info else "no AVX2")
    return f"{name}, {vector}"


def record():
    """What every JSON records of where it was measured."""
    return {"backend": BACKEND, BACKEND: VERSION,
            "cpu_count": os.cpu_count(), "cpu": cpu()}


def _variables(layers):
    return [v for layer in layers for v in layer.variables]


def compiled(fn, layers, mode):
    """`fn()` (which calls `layers`) compiled as `mode` says."""
    if BACKEND == "tensorflow":
        return tf.function(fn, jit_compile=mode == "jit_compile")
    variables = _variables(layers)

    def pure(values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn()

    jitted = jax.jit(pure)
    return lambda: jitted([v.value for v in variables])


def gradient_step(layer, x, mode):
    """The gradient of `mean(layer(x) ** 2)` over the layer's trainable
    weights, compiled as `mode` says."""
    def loss(y):
        return keras.ops.mean(keras.ops.square(y))

    if BACKEND == "tensorflow":
        def step():
            with tf.GradientTape() as tape:
                value = loss(layer(x))
            return tape.gradient(value, layer.trainable_weights)
        return tf.function(step, jit_compile=mode == "jit_compile")

    def pure(trainable, non_trainable):
        y, _ = layer.stateless_call(trainable, non_trainable, x)
        return loss(y)

    grad = jax.jit(jax.grad(pure))
    return lambda: grad([v.value for v in layer.trainable_variables],
                        [v.value for v in layer.non_trainable_variables])
