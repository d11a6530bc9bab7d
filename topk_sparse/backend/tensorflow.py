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


def has_value(variable):
    """Always: a TensorFlow variable can be read wherever it is in scope."""
    return True


def sampling_seed(pair):
    """The seed `sample` takes: int64 `[2]` from `pair` (numpy), or drawn
    by a stateful op when `pair` is None (a traced `generate` samples anew
    at each call)."""
    if pair is None:
        return tf.random.uniform([2], 0, tf.int64.max, tf.int64)
    return tf.constant(pair, tf.int64)


def sample(logits, seed, step):
    """One token per row of float32 `logits` `[batch, vocab]`, int32
    `[batch]`, from `seed` folded with `step` (stateless)."""
    step_seed = tf.random.experimental.stateless_fold_in(seed, step)
    return tf.random.stateless_categorical(logits, 1, step_seed,
                                           dtype=tf.int32)[:, 0]


def while_loop(cond, body, loop_vars, maximum_iterations, model):
    """`tf.while_loop`: the variables of `model` that `body` updates (its
    layers' metric counts) are TensorFlow resources, updated in place."""
    return tf.while_loop(cond, body, loop_vars,
                         maximum_iterations=maximum_iterations)


def compiled(fn, model):
    """`fn` (which calls `model`) as a `tf.function`: the model's
    variables are TensorFlow resources, read and updated in place."""
    del model
    return tf.function(fn, reduce_retracing=True)


def static_value(x):
    """`x` as numpy where its value is known (eager), else None (traced)."""
    return tf.get_static_value(x)
