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
- `NegativeLogLikelihood`: mean cross-entropy of the true class; exact from
  logits, scikit-learn's `log_loss` convention from probabilities.
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

from topk_sparse import checks

# NegativeLogLikelihood clips probabilities to [eps, 1 - eps] with float32's
# machine epsilon (2**-23, about 1.19e-7): scikit-learn's `log_loss` clips
# with `np.finfo(y_proba.dtype).eps`, and the metric computes in float32.
_EPSILON = float(np.finfo(np.float32).eps)


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


NUM_BINS = 15
"""The ECE's bin count everywhere here (metric, callback, robustness,
reports): 15, the common default (Guo et al.); the Lazy Neuron paper does
not publish the count behind its Table 1."""


@keras.saving.register_keras_serializable(package="topk_sparse")
class ExpectedCalibrationError(_CalibrationMetric):
    """Expected calibration error of the top-1 confidence, equal-width bins.

    With bins `[i/B, (i+1)/B)` (a confidence of exactly 1.0 goes in the last
    one), `ECE = sum_b (n_b / N) * |acc_b - conf_b|`, where `acc_b` is the
    share of correct top-1 predictions in bin `b` and `conf_b` their mean
    confidence. Sample weights weight both the counts and the means.

    Args:
        num_bins: int. Number of equal-width confidence bins. Defaults to
            `NUM_BINS` (15).
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
        num_bins=NUM_BINS,
        from_logits=False,
        name="expected_calibration_error",
        **kwargs,
    ):
        num_bins = checks.positive_int(num_bins, "num_bins")
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


def _reliability_summary(diagram):
    """The numbers `reliability_diagram_image` draws, from the bin sums.

    Returns:
        A dict with `"total"` (summed sample weight), per bin `"share"`
        (share of the samples), `"filled"` (whether a bin holds any) and
        `"gap"` (mean confidence minus accuracy), and over all samples
        `"expected_calibration_error"`, `"confidence"` (mean top-1
        confidence) and `"accuracy"` (top-1); all 0 with no samples.
    """
    count = np.asarray(diagram["count"], np.float64)
    confidence = np.asarray(diagram["confidence"], np.float64)
    accuracy = np.asarray(diagram["accuracy"], np.float64)
    total = count.sum()
    share = count / total if total > 0 else np.zeros_like(count)
    return {
        "total": total,
        "share": share,
        "filled": count > 0,
        "gap": confidence - accuracy,
        "expected_calibration_error": np.sum(
            share * np.abs(confidence - accuracy)),
        "confidence": np.sum(share * confidence),
        "accuracy": np.sum(share * accuracy),
    }


def reliability_diagram_image(diagram, title=None, dpi=100):
    """Draws a reliability diagram as an RGB image for `tf.summary.image`.

    As in Guo et al. 2017, Figure 1. Top: per confidence bin, a blue
    "Outputs" bar as high as the bin's accuracy, a red hatched "Gap" bar
    from there to the bin's mean confidence (the quantity the ECE averages),
    and the dashed diagonal of perfect calibration; the ECE in % is in the
    title. Bottom: the confidence histogram, the share of samples in each
    bin (summed sample weight), with dashed lines at the overall accuracy
    and mean confidence; an overconfident model has its accuracy line left
    of its confidence line. Empty bins draw no bar.

    Drawn with matplotlib's Agg canvas on a `Figure` that pyplot never sees:
    no display, no pyplot figure to close, nothing kept after the call.
    About 0.2 s per image (0.17-0.29 s measured on a shared 2-core CPU).

    Args:
        diagram: dict. The output of
            `ExpectedCalibrationError.reliability_diagram()`.
        title: str or None. A line above the plots (e.g. model and epoch).
            Defaults to `None`, no line.
        dpi: int. Pixels per inch of the 4.8 x 6 inch figure. Defaults to
            100: a 480 x 600 image.

    Returns:
        A `np.uint8` array of shape `[1, height, width, 3]`.

    Example:

    >>> ece = ExpectedCalibrationError(num_bins=10)
    >>> ece.update_state([0, 1], [[0.9, 0.1], [0.3, 0.7]])
    >>> reliability_diagram_image(ece.reliability_diagram()).shape
    (1, 600, 480, 3)

    References:
        - [Guo et al., 2017](https://arxiv.org/abs/1706.04599)
    """
    # Imported here: matplotlib adds 0.8 s (measured) to `import topk_sparse`
    # for a function only callbacks call.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    summary = _reliability_summary(diagram)
    edges = np.asarray(diagram["bin_edges"], np.float64)
    accuracy = np.asarray(diagram["accuracy"], np.float64)
    filled = summary["filled"]
    centers = ((edges[:-1] + edges[1:]) / 2)[filled]
    width = np.diff(edges)[filled]

    figure = Figure(figsize=(4.8, 6.0), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title)
    diagram_axes, histogram_axes = figure.subplots(
        2, 1, gridspec_kw={"height_ratios": [2.2, 1]})

    outputs = {"facecolor": "#3b6fb6", "edgecolor": "black",
               "linewidth": 0.6, "label": "Outputs"}
    gap = {"facecolor": (0.9, 0.2, 0.2, 0.25), "edgecolor": (0.8, 0.1, 0.1),
           "hatch": "//", "linewidth": 0.6, "label": "Gap"}
    diagram_axes.bar(centers, accuracy[filled], width, **outputs)
    # Drawn over the outputs: an underconfident bin's gap hatches its top.
    diagram_axes.bar(centers, summary["gap"][filled], width,
                     bottom=accuracy[filled], **gap)
    (diagonal,) = diagram_axes.plot([0, 1], [0, 1], "--", color="0.3",
                                    linewidth=1, label="Perfect calibration")
    diagram_axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="Confidence",
                     ylabel="Accuracy")
    diagram_axes.set_title(
        f"ECE = {100 * summary['expected_calibration_error']:.2f}% "
        f"({len(edges) - 1} bins)")
    # Patches, not the bars: with no samples there are no bars to copy.
    diagram_axes.legend(handles=[diagonal, Patch(**outputs), Patch(**gap)],
                        loc="upper left")

    histogram_axes.bar(centers, 100 * summary["share"][filled], width,
                       color="#7d93b5", edgecolor="black", linewidth=0.6)
    if summary["total"] > 0:
        histogram_axes.axvline(summary["accuracy"], color="#2a9d3c",
                               linestyle="--", linewidth=1.5,
                               label=f"Accuracy ({summary['accuracy']:.3f})")
        histogram_axes.axvline(summary["confidence"], color="#d17a00",
                               linestyle="--", linewidth=1.5,
                               label="Avg. confidence "
                                     f"({summary['confidence']:.3f})")
        histogram_axes.legend(loc="upper left", fontsize="small")
    histogram_axes.set(xlim=(0, 1), xlabel="Confidence",
                       ylabel="% of samples",
                       title=f"Confidence histogram, "
                             f"N = {summary['total']:,.6g}")
    histogram_axes.set_ylim(0, None if summary["total"] > 0 else 100)

    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(image)[None]


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
    """Mean negative log-likelihood (cross-entropy) of the true class, in nats.

    The two input forms follow two conventions:

    - Probabilities (`from_logits=False`): scikit-learn's `log_loss`. Each
      probability is clipped to `[eps, 1 - eps]` with float32's machine
      epsilon `eps = 2**-23` (about 1.19e-7), and is not renormalized. The
      result equals `sklearn.metrics.log_loss(y, p)` on the float32 `p` the
      metric sees (sklearn's `eps` is that of its input's dtype: on float64
      input it clips at 2.2e-16 instead). A sample thus costs at most
      `-log(eps)`, about 15.94 nats, and a certain right answer costs
      `-log(1 - eps)`, about 1.2e-7 nats, not 0.
    - Logits (`from_logits=True`): the exact NLL, `logsumexp(z) - z_y` by
      `log_softmax` in float32, with no clipping.

    They agree, to float32 rounding, while every true-class probability
    lies in `[eps, 1 - eps]`. They differ for saturated predictions: float32
    holds no probability below about 1e-45 (1e-38 where denormals are
    flushed; a softmax returns 0), and one below `eps` is clipped, so a
    confident mistake that costs 23 or 200 nats from its logits costs 15.94
    nats from its probabilities. The probabilities no longer hold the
    information, so no epsilon recovers it: report NLL from logits where the
    model has them, and name the form when comparing numbers.

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
    >>> logits = np.float32([[0.0, 30.0]])  # sure of class 1; label 0
    >>> exact = NegativeLogLikelihood(from_logits=True)
    >>> exact.update_state([0], logits)
    >>> round(float(exact.result()), 2)
    30.0
    >>> clipped = NegativeLogLikelihood()
    >>> clipped.update_state([0], keras.ops.softmax(logits))
    >>> round(float(clipped.result()), 2)  # -log(2**-23), as sklearn
    15.94

    References:
        - [Guo et al., 2017](https://arxiv.org/abs/1706.04599)
        - [scikit-learn `log_loss`](https://scikit-learn.org/stable/modules/generated/sklearn.metrics.log_loss.html)
    """

    def __init__(self, from_logits=False, name="negative_log_likelihood",
                 **kwargs):
        super().__init__(from_logits=from_logits, name=name, **kwargs)

    def _per_sample(self, labels, y_pred):
        if self.from_logits:
            log_probs = ops.log_softmax(y_pred, axis=-1)
        else:
            log_probs = ops.log(ops.clip(y_pred, _EPSILON, 1.0 - _EPSILON))
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

