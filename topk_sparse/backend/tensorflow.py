"""The TensorFlow backend's part (see `topk_sparse.backend`)."""

import tensorflow as tf


def approx_max_k(x, k, recall_target):
    return tf.math.approx_max_k(x, k, recall_target=recall_target)


def on_tpu():
    """True when TensorFlow has initialized TPU devices in this process."""
    return bool(tf.config.list_logical_devices("TPU"))


def compiled_by_xla():
    """Whether the graph being built will be compiled by XLA
    (`jit_compile=True`, TPU): the private test TensorFlow's own
    `tf.function` uses; False where it is missing."""
    try:
        from tensorflow.python.framework import ops as framework_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow without them
        return False
    return control_flow_util.GraphOrParentsInXlaContext(
        framework_ops.get_default_graph())
