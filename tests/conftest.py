"""Test session setup: two logical CPUs, before the backend starts, and
which test modules run on which Keras backend."""

import os

# JAX: two host devices (keras.distribution tests); set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=2")

import keras  # noqa: E402

from tests.backend import JAX_XLA_FLAGS  # noqa: E402

if keras.config.backend() == "jax":
    # JAX's XLA reads XLA_FLAGS once, when its backend starts: the collective
    # timeouts for this process only, not for the TensorFlow processes that
    # tests start (TensorFlow 2.20's XLA aborts on these flags).
    shared = os.environ["XLA_FLAGS"]
    os.environ["XLA_FLAGS"] = f"{shared} {JAX_XLA_FLAGS}"
    import jax  # noqa: E402
    jax.devices()
    os.environ["XLA_FLAGS"] = shared

# Modules written against tests/backend.py, numpy and keras.ops (and
# TensorBoard's event files): they run under every backend
# (KERAS_BACKEND=jax too). The others test what is TensorFlow's (tf.data,
# tf.distribute, the trainers on TensorFlow, Model Garden) or spawn both
# backends themselves; they run under the TensorFlow backend.
BACKEND_NEUTRAL = ("test_ops.py", "test_sparsity.py", "test_layers.py",
                   "test_layer_checks.py", "test_layer_training.py",
                   "test_models.py", "test_generate.py",
                   "test_docstrings.py", "test_scoring.py",
                   "test_callbacks.py", "test_allocation.py")

# What exists on JAX only: the trainers through keras.distribution (their
# TensorFlow runs are test_training.py's).
JAX_ONLY = ("test_training_jax.py",)

if keras.config.backend() == "tensorflow":
    import tests.devices  # noqa: F401
    collect_ignore = list(JAX_ONLY)
else:
    collect_ignore = sorted(
        name for name in os.listdir(os.path.dirname(__file__))
        if name.startswith("test_") and name.endswith(".py")
        and name not in BACKEND_NEUTRAL + JAX_ONLY)
