"""Calibration metrics for classifiers, as Keras 3 metrics.

The Lazy Neuron paper (arXiv 2210.06313, Table 1) reports that Top-k MLPs
make ViT better calibrated (ECE 8.42 -> 7.48). Keras 3 ships no calibration
metric, and `tfp.stats` only imports with `tf-keras` installed, so this module
provides three, usable in `model.compile(metrics=[...])`, inside a
`jit_compile=True` step or under `tf.distribute.MirroredStrategy`:

- `ExpectedCalibrationError`: the equal-width-bin estimator of Naeini et al.
  2015 (AAAI, "Obtaining Well Calibrated Probabilities Using Bayesian
  Binning") in the form of Guo et al. 2017 (arXiv 1706.04599, eq. 3), over the
  top-1 confidence. `reliability_diagram_image` draws its reliability diagram
  (Guo et al. Figure 1) for `tf.summary.image`.
- `NegativeLogLikelihood`: mean cross-entropy of the true class.
- `BrierScore`: the multi-class Brier score (Brier 1950), summed over classes
  and averaged over samples, as in Ovadia et al. 2019 (arXiv 1906.02530).

Every metric keeps only sums in float32 variables created with
`aggregation="sum"`: under `MirroredStrategy` Keras 3 makes them
`SyncOnRead` variables, so reading them outside a replica (where `evaluate`
and `fit` compute their epoch logs) adds the replicas' states, and the
result is the metric of the whole data set. Two Keras 3.15 traps, measured
on two logical CPUs:
per-batch logs (`on_*_batch_end`) are the mean of per-replica results, not
the global value; and `jit_compile=True` with a multi-device strategy fails
("Trying to access resource ... located in device"), so use `"auto"`, which
turns XLA off under `tf.distribute`. Sample weights reach a compiled metric
only through `compile(weighted_metrics=[...])`.

Labels may be sparse integers, `[batch]` or `[batch, 1]`, or one-hot
`[batch, classes]` (reduced to their argmax, so soft labels count as their
top class). Predictions are `[batch, classes]` probabilities, or logits with
`from_logits=True`, and are cast to float32 first so that bfloat16 / float16
outputs of a mixed-precision model lose nothing more in the metric.
"""

import keras
import numpy as np
from keras import ops

# Keeps log() finite for a true-class probability of 0 (Keras' own epsilon).
_EPSILON = 1e-7


class _CalibrationMetric(keras.metrics.Metric):
    """Shared argument handling: labels to int32, predictions to float32."""

    def __init__(self, from_logits=False, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.from_logits = bool(from_logits)

    def _sum_variable(self, name, shape=()):
        # "sum": replica states add up when read outside the replica context.
        return self.add_variable(
            shape=shape,
            initializer="zeros",
            dtype="float32",
            aggregation="sum",
            name=name,
        )

    def _standardize(self, y_true, y_pred, sample_weight):
        """Returns (int32 labels [b], float32 y_pred [b, c], weights [b])."""
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.convert_to_tensor(y_true)
        if len(y_pred.shape) != 2 or y_pred.shape[-1] is None:
            raise ValueError(
                f"{self.name}: `y_pred` must have shape [batch, classes] with "
                f"a known number of classes. Received: shape={y_pred.shape}"
            )
        num_classes = y_pred.shape[-1]
        if len(y_true.shape) == 1 or (
            len(y_true.shape) == 2 and y_true.shape[-1] == 1
        ):
            labels = ops.reshape(ops.cast(y_true, "int32"), [-1])
        elif len(y_true.shape) == 2 and y_true.shape[-1] == num_classes:
            labels = ops.cast(ops.argmax(y_true, axis=-1), "int32")
        else:
            raise ValueError(
                f"{self.name}: `y_true` must be sparse labels [batch] or "
                f"[batch, 1], or one-hot [batch, {num_classes}]. "
                f"Received: shape={y_true.shape}"
            )
        weights = ops.ones_like(labels, dtype="float32")
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, "float32")
            # A scalar, [batch] or [batch, 1] weight: one number per sample.
            weights = weights * ops.reshape(sample_weight, [-1])
        # float32 before softmax / log: bfloat16 has only 8 mantissa bits.
        return labels, ops.cast(y_pred, "float32"), weights

    def _probs(self, y_pred):
        return ops.softmax(y_pred, axis=-1) if self.from_logits else y_pred

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="topk_sparse")
class ExpectedCalibrationError(_CalibrationMetric):
    """Expected calibration error of the top-1 confidence, equal-width bins.

    With bins `[i/B, (i+1)/B)` (a confidence of exactly 1.0 goes in the last
    one), `ECE = sum_b (n_b / N) * |acc_b - conf_b|`, where `acc_b` is the
    share of correct top-1 predictions in bin `b` and `conf_b` their mean
    confidence. Sample weights weight both the counts and the means.

    Args:
        num_bins: int. Number of equal-width confidence bins. Defaults to 15,
            the common default (the Lazy Neuron paper does not publish the
            count it used).
        from_logits: bool. Whether `y_pred` holds logits rather than
            probabilities. Defaults to `False`.
        name: str. Name of the metric. Defaults to
            `"expected_calibration_error"`.

    Example:

    >>> ece = ExpectedCalibrationError(num_bins=2)
    >>> ece.update_state([0, 1], [[0.9, 0.1], [0.8, 0.2]])
    >>> round(float(ece.result()), 4)  # one bin: acc 0.5, conf 0.85
    0.35
    >>> ece.reliability_diagram()["count"]
    array([0., 2.], dtype=float32)

    References:
        - [Naeini et al., 2015](https://ojs.aaai.org/index.php/AAAI/article/view/9602)
        - [Guo et al., 2017](https://arxiv.org/abs/1706.04599)
    """

    def __init__(
        self,
        num_bins=15,
        from_logits=False,
        name="expected_calibration_error",
        **kwargs,
    ):
        if isinstance(num_bins, bool) or not isinstance(
            num_bins, (int, np.integer)
        ) or num_bins < 1:
            raise ValueError(
                "`num_bins` must be a positive int. "
                f"Received: num_bins={num_bins!r}"
            )
        super().__init__(from_logits=from_logits, name=name, **kwargs)
        self.num_bins = int(num_bins)
        self.bin_count = self._sum_variable("bin_count", (self.num_bins,))
        self.bin_confidence = self._sum_variable(
            "bin_confidence", (self.num_bins,)
        )
        self.bin_accuracy = self._sum_variable(
            "bin_accuracy", (self.num_bins,)
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels, y_pred, weights = self._standardize(
            y_true, y_pred, sample_weight
        )
        probs = self._probs(y_pred)
        confidence = ops.max(probs, axis=-1)
        correct = ops.cast(
            ops.equal(ops.cast(ops.argmax(probs, axis=-1), "int32"), labels),
            "float32",
        )
        # floor(conf * B) puts conf == 1.0 at index B: clip it into the last.
        bins = ops.clip(
            ops.cast(ops.floor(confidence * self.num_bins), "int32"),
            0,
            self.num_bins - 1,
        )
        # [batch, B] one-hot sums: static shapes, so XLA compiles it as is.
        member = ops.one_hot(bins, self.num_bins, dtype="float32")
        member = member * weights[:, None]
        self.bin_count.assign_add(ops.sum(member, axis=0))
        self.bin_confidence.assign_add(
            ops.sum(member * confidence[:, None], axis=0)
        )
        self.bin_accuracy.assign_add(
            ops.sum(member * correct[:, None], axis=0)
        )

    def result(self):
        # sum_b (n_b/N) |acc_b/n_b - conf_b/n_b| = sum_b |acc_b - conf_b| / N.
        gaps = ops.abs(self.bin_accuracy - self.bin_confidence)
        return ops.divide_no_nan(ops.sum(gaps), ops.sum(self.bin_count))

    def reliability_diagram(self):
        """Returns the reliability diagram's data as numpy arrays.

        Call it outside `strategy.run` (as a callback does): there the
        replicas' bin sums are added up.

        Returns:
            A dict with `"bin_edges"` (`[num_bins + 1]`), and per bin
            `"count"` (summed sample weight), `"confidence"` (mean top-1
            confidence) and `"accuracy"` (share of correct top-1
            predictions); the means are 0 where a bin is empty.
        """
        count = self.bin_count.numpy()
        safe = np.where(count > 0, count, 1.0)
        return {
            "bin_edges": np.linspace(
                0.0, 1.0, self.num_bins + 1, dtype=np.float32
            ),
            "count": count,
            "confidence": self.bin_confidence.numpy() / safe,
            "accuracy": self.bin_accuracy.numpy() / safe,
        }

    def get_config(self):
        return {**super().get_config(), "num_bins": self.num_bins}


def reliability_diagram_image(diagram, size=128):
    """Draws a reliability diagram as an RGB image for `tf.summary.image`.

    Each non-empty bin is a blue bar as high as its accuracy; the gap up or
    down to its mean confidence is red (Guo et al. 2017, Figure 1), and the
    black diagonal is perfect calibration. Axes run from 0 to 1, confidence
    to the right and accuracy up; there are no labels (numpy only).

    Args:
        diagram: dict. The output of
            `ExpectedCalibrationError.reliability_diagram()`.
        size: int. Height and width of the image in pixels. Defaults to 128.

    Returns:
        A `np.uint8` array of shape `[1, size, size, 3]`.

    Example:

    >>> ece = ExpectedCalibrationError(num_bins=10)
    >>> ece.update_state([0, 1], [[0.9, 0.1], [0.3, 0.7]])
    >>> reliability_diagram_image(ece.reliability_diagram()).shape
    (1, 128, 128, 3)
    """
    edges = np.asarray(diagram["bin_edges"], np.float64)
    count = np.asarray(diagram["count"], np.float64)
    accuracy = np.asarray(diagram["accuracy"], np.float64)
    confidence = np.asarray(diagram["confidence"], np.float64)
    # Pixel centres: x = confidence axis, y = accuracy axis (row 0 is top).
    x = (np.arange(size) + 0.5) / size
    y = 1.0 - (np.arange(size) + 0.5) / size
    column_bin = np.clip(np.searchsorted(edges, x, side="right") - 1,
                         0, len(count) - 1)
    filled = count[column_bin] > 0
    acc = np.where(filled, accuracy[column_bin], 0.0)[None, :]
    conf = np.where(filled, confidence[column_bin], 0.0)[None, :]
    yy = y[:, None]
    image = np.full((size, size, 3), 255, np.uint8)
    image[(yy < acc) & filled] = (66, 114, 196)  # accuracy bar
    gap = (yy >= np.minimum(acc, conf)) & (yy < np.maximum(acc, conf))
    image[gap & filled] = (228, 90, 80)  # calibration gap
    image[np.abs(yy - x[None, :]) < 1.0 / size] = (0, 0, 0)  # diagonal
    return image[None]


class _SampleMean(_CalibrationMetric):
    """Weighted mean over samples of `_per_sample(labels, y_pred)`."""

    def __init__(self, from_logits=False, name=None, **kwargs):
        super().__init__(from_logits=from_logits, name=name, **kwargs)
        self.total = self._sum_variable("total")
        self.count = self._sum_variable("count")

    def _per_sample(self, labels, y_pred):
        raise NotImplementedError

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels, y_pred, weights = self._standardize(
            y_true, y_pred, sample_weight
        )
        self.total.assign_add(ops.sum(weights * self._per_sample(labels, y_pred)))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)


@keras.saving.register_keras_serializable(package="topk_sparse")
class NegativeLogLikelihood(_SampleMean):
    """Mean negative log-likelihood (cross-entropy) of the true class.

    Probabilities are clipped to `[1e-7, 1]` so a confident mistake costs
    about 16.1 nats instead of infinity; with `from_logits=True` the exact
    `log_softmax` is used.

    Args:
        from_logits: bool. Whether `y_pred` holds logits rather than
            probabilities. Defaults to `False`.
        name: str. Name of the metric. Defaults to
            `"negative_log_likelihood"`.

    Example:

    >>> nll = NegativeLogLikelihood()
    >>> nll.update_state([0, 1], [[0.5, 0.5], [0.5, 0.5]])
    >>> round(float(nll.result()), 4)  # log 2
    0.6931

    References:
        - [Guo et al., 2017](https://arxiv.org/abs/1706.04599)
    """

    def __init__(self, from_logits=False, name="negative_log_likelihood",
                 **kwargs):
        super().__init__(from_logits=from_logits, name=name, **kwargs)

    def _per_sample(self, labels, y_pred):
        if self.from_logits:
            log_probs = ops.log_softmax(y_pred, axis=-1)
        else:
            log_probs = ops.log(ops.clip(y_pred, _EPSILON, 1.0))
        return -ops.sum(
            log_probs * ops.one_hot(labels, y_pred.shape[-1], dtype="float32"),
            axis=-1,
        )


@keras.saving.register_keras_serializable(package="topk_sparse")
class BrierScore(_SampleMean):
    """Multi-class Brier score: mean over samples of `sum_c (p_c - y_c)^2`.

    It ranges from 0 (certain and right) to 2 (certain and wrong).

    Args:
        from_logits: bool. Whether `y_pred` holds logits rather than
            probabilities. Defaults to `False`.
        name: str. Name of the metric. Defaults to `"brier_score"`.

    Example:

    >>> brier = BrierScore()
    >>> brier.update_state([0, 1], [[1.0, 0.0], [0.5, 0.5]])
    >>> float(brier.result())  # (0 + 0.5) / 2
    0.25

    References:
        - [Brier, 1950](https://doi.org/10.1175/1520-0493(1950)078<0001:VOFEIT>2.0.CO;2)
        - [Ovadia et al., 2019](https://arxiv.org/abs/1906.02530)
    """

    def __init__(self, from_logits=False, name="brier_score", **kwargs):
        super().__init__(from_logits=from_logits, name=name, **kwargs)

    def _per_sample(self, labels, y_pred):
        probs = self._probs(y_pred)
        one_hot = ops.one_hot(labels, probs.shape[-1], dtype="float32")
        return ops.sum(ops.square(probs - one_hot), axis=-1)

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

