"""Two logical CPU devices and the one MirroredStrategy the tests share.

Logical devices must be configured before TensorFlow initializes them, so
conftest.py imports this module first. One strategy serves the whole session:
two MirroredStrategy objects in one process reuse collective instance keys,
and a second model's gradient all-reduce then fails with "Shape mismatch in
the collective instance".
"""

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
if len(tf.config.get_logical_device_configuration(_cpu) or []) < 2:
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


@functools.cache
def mirrored_strategy():
    """MirroredStrategy over the two logical CPUs, made once per session."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
