"""One place that picks how a run is distributed, on either Keras backend.

On TensorFlow, a `tf.distribute` strategy:

- `"tpu"`: `TPUStrategy` over a TPU VM's chips (`tpu="local"`), a named
  Cloud TPU or a `grpc://` address (TPU Node, Colab's old TPU runtime), a
  slice or pod included.
- `"mirrored"`: `MirroredStrategy` over the visible GPUs of this host, or,
  with none, over its logical CPU devices (how the tests exercise the same
  code paths without an accelerator).
- `"cpu"`: the default strategy (one device).
- `"auto"`: a TPU if one answers, else `"mirrored"` with more than one GPU,
  else the default strategy.

On JAX, the same names mean the same devices through `keras.distribution`
(a `KerasDistribution`: data parallel, the batch split over the devices,
the weights replicated): `"tpu"` the TPU chips JAX sees, `"mirrored"` every
GPU of the host or its logical CPU devices, `"cpu"` one device, `"auto"`
TPU chips, else more than one GPU, else one device. A multi-host TPU slice
on JAX needs `keras.distribution.initialize()` before the run; `tpu` names
a TPU for TensorFlow's resolver only.

Keras 3 does not support `MultiWorkerMirroredStrategy` (keras-team/keras
#20585): multi-host training here means a TPU slice or pod.
"""

import contextlib
import logging as pylogging

from absl import logging
import keras
import tensorflow as tf

from topk_sparse import checks

STRATEGIES = ("auto", "tpu", "mirrored", "cpu")

# What `TPUClusterResolver` and `initialize_tpu_system` raise when there is no
# TPU to find (seen here): ValueError for no TPU name in the environment,
# OSError (URLError) when the GCE metadata server or the TPU name does not
# resolve, NotFoundError when this TensorFlow has no TPU kernels or the
# cluster has no TPUs, UnavailableError when a TPU address does not answer.
_NO_TPU_ERRORS = (ValueError, OSError, tf.errors.NotFoundError,
                  tf.errors.UnavailableError)

# One strategy object per device set and process. Two MirroredStrategy
# objects in one process reuse collective instance keys (the second model's
# all-reduce then fails with "Shape mismatch in the collective instance"),
# and initializing a TPU system twice wipes the variables on it.
_STRATEGIES = {}


def get_strategy(name="auto", tpu="local", num_cpu_devices=None):
    """Returns the `tf.distribute.Strategy` named `name`, or on the JAX
    backend the `KerasDistribution` of the same devices.

    Args:
      name: str. One of `STRATEGIES`: `"auto"`, `"tpu"`, `"mirrored"` or
        `"cpu"`. Defaults to `"auto"`.
      tpu: str. The TPU to connect to: `"local"` (a TPU VM, Colab's TPU
        runtime), a Cloud TPU name or a `grpc://host:port` address. Defaults
        to `"local"`.
      num_cpu_devices: int or None. For `"mirrored"` on a host without GPUs:
        split the CPU into this many logical devices, which must happen
        before TensorFlow (or JAX) first runs an op. None uses the logical
        CPU devices already configured.

    Returns:
      A strategy; the same object for the same request within one process.

    Raises:
      ValueError: for an unknown `name`.
      RuntimeError: for `"tpu"` when no TPU answers, or when the logical CPU
        devices can no longer be changed.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}: choose one of {STRATEGIES}.")
    if keras.config.backend() == "jax":
        return _keras_distribution(name, tpu, num_cpu_devices)
    if name == "cpu":
        return tf.distribute.get_strategy()
    if name == "tpu":
        try:
            return _tpu_strategy(tpu)
        except _NO_TPU_ERRORS as e:
            raise RuntimeError(
                f"No TPU found for tpu={tpu!r} ({type(e).__name__}: {e}). "
                f"Use tpu='local' on a TPU VM, a Cloud TPU name or a "
                f"grpc:// address, or another strategy from {STRATEGIES}."
            ) from e
    if name == "mirrored":
        return _mirrored_strategy(num_cpu_devices)
    # TensorFlow logs "Initializing the TPU system" at INFO before it finds
    # none: quiet while looking, so that a CPU run does not read as a TPU.
    tf_logger, level = tf.get_logger(), tf.get_logger().level
    tf_logger.setLevel(max(level, pylogging.WARNING))
    try:
        return _tpu_strategy(tpu)
    except _NO_TPU_ERRORS as e:
        logging.info("No TPU for tpu=%r (%s: %s).", tpu, type(e).__name__,
                     str(e).split("\n", 1)[0][:200])
    finally:
        tf_logger.setLevel(level)
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return _mirrored_strategy(num_cpu_devices)
    return tf.distribute.get_strategy()


class KerasDistribution:
    """A `keras.distribution` as the trainer uses a strategy: `scope()`
    (build the model, fit and evaluate inside) and `num_replicas_in_sync`.

    Args:
      distribution: `keras.distribution.DataParallel` or None (one device:
        nothing is distributed).
    """

    def __init__(self, distribution):
        self.distribution = distribution

    @property
    def num_replicas_in_sync(self):
        if self.distribution is None:
            return 1
        return self.distribution.device_mesh.devices.size

    @property
    def name(self):
        return type(self.distribution).__name__ if self.distribution \
            else "OneDevice"

    def scope(self):
        if self.distribution is None:
            return contextlib.nullcontext()
        return self.distribution.scope()


def name_of(strategy):
    """The strategy's name in reports: `MirroredStrategy`, `TPUStrategy`,
    `DefaultDistributionStrategy`; `DataParallel` or `OneDevice` on JAX."""
    if isinstance(strategy, KerasDistribution):
        return strategy.name
    return type(strategy).__name__.lstrip("_")


def running(strategy):
    """The context `fit` and `evaluate` run in: the distribution on JAX
    (Keras's JAX trainer splits each batch by it); none on TensorFlow,
    whose trainer enters the model's strategy itself."""
    if isinstance(strategy, KerasDistribution):
        return strategy.scope()
    return contextlib.nullcontext()


def per_replica_batch(global_batch, strategy):
    """`global_batch // replicas`, raising if it does not divide evenly.

    Every replica must see the same static batch shape (TPU compiles one
    program for all of them), so the global batch must be a multiple of the
    replica count.
    """
    replicas = strategy.num_replicas_in_sync
    if global_batch <= 0 or global_batch % replicas:
        raise ValueError(
            f"The global batch size {global_batch} must be a positive "
            f"multiple of the {replicas} replicas of "
            f"{type(strategy).__name__}: try "
            f"{max(replicas, global_batch // replicas * replicas)}.")
    return global_batch // replicas


def _keras_distribution(name, tpu, num_cpu_devices):
    import jax

    if tpu != "local":
        raise ValueError(
            f"tpu={tpu!r} names a TPU for TensorFlow's resolver; on JAX the "
            f"TPU is the one jax.devices() shows: leave tpu='local'.")
    if name == "mirrored" and num_cpu_devices is not None:
        num_cpu_devices = checks.positive_int(num_cpu_devices,
                                              "num_cpu_devices")
        try:
            jax.config.update("jax_num_cpu_devices", num_cpu_devices)
        except RuntimeError as e:
            if len(jax.devices("cpu")) != num_cpu_devices:
                raise RuntimeError(
                    f"Cannot split the CPU into {num_cpu_devices} devices: "
                    f"JAX already runs with {len(jax.devices('cpu'))}. Call "
                    f"get_strategy() before any JAX op runs.") from e
    platform = jax.default_backend()
    if name == "tpu" and platform != "tpu":
        raise RuntimeError(
            f"No TPU found: JAX computes on {platform} "
            f"({jax.device_count()} devices). Run on a TPU VM, or use "
            f"another strategy from {STRATEGIES}.")
    devices = jax.devices()
    if name == "cpu" or len(devices) == 1 or (
            name == "auto" and platform not in ("tpu", "gpu")):
        devices = devices[:1]
    key = ("jax", tuple(d.id for d in devices))
    if key not in _STRATEGIES:
        _STRATEGIES[key] = KerasDistribution(
            keras.distribution.DataParallel(devices=devices)
            if len(devices) > 1 else None)
    return _STRATEGIES[key]


def _tpu_strategy(tpu):
    key = ("tpu", tpu)
    if key not in _STRATEGIES:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        _STRATEGIES[key] = tf.distribute.TPUStrategy(resolver)
    return _STRATEGIES[key]


def _mirrored_strategy(num_cpu_devices):
    # Physical devices first: listing logical ones starts the runtime, after
    # which the CPU can no longer be split.
    if tf.config.list_physical_devices("GPU"):
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    else:
        devices = _logical_cpus(num_cpu_devices)
    key = ("mirrored", tuple(devices))
    if key not in _STRATEGIES:
        _STRATEGIES[key] = tf.distribute.MirroredStrategy(devices)
    return _STRATEGIES[key]


def _logical_cpus(num_cpu_devices):
    """Names of the logical CPU devices, first making `num_cpu_devices`."""
    if num_cpu_devices is not None:
        num_cpu_devices = checks.positive_int(num_cpu_devices,
                                              "num_cpu_devices")
        cpu = tf.config.list_physical_devices("CPU")[0]
        configured = len(tf.config.get_logical_device_configuration(cpu)
                         or [None])
        if configured != num_cpu_devices:
            try:
                tf.config.set_logical_device_configuration(
                    cpu, [tf.config.LogicalDeviceConfiguration()]
                    * num_cpu_devices)
            except RuntimeError as e:
                raise RuntimeError(
                    f"Cannot split the CPU into {num_cpu_devices} logical "
                    f"devices: TensorFlow already runs with {configured}. "
                    f"Call get_strategy() before any TensorFlow op runs."
                ) from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]
