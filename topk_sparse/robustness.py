"""Robustness to input corruptions: accuracy and calibration, CIFAR-10-C style.

The Lazy Neuron paper (arXiv 2210.06313, Table 1) reports that Top-k MLPs
make a Transformer more robust to corrupted inputs and better calibrated.
This module measures both for a trained classifier (logits out):

- `evaluate_corruptions(model, dataset)` corrupts a clean evaluation split
  on the fly (`topk_sparse.data.corruptions`) at each severity and measures
  top-1 accuracy and expected calibration error (`NUM_BINS`) on the clean and
  every corrupted pass. Batch `i` is corrupted with seed `(seed, i)`, so a
  run is reproducible, and the same noise is scaled across severities.
- `evaluate_cifar10_c(model, batch_size)` does the same on the published
  CIFAR-10-C records in TFDS (Hendrycks & Dietterich, arXiv 1903.12261).
- `format_table(result)` prints the result, `write_summaries` logs it to
  TensorBoard as `robustness/<corruption>/accuracy` and
  `robustness/<corruption>/expected_calibration_error`.

The result is a JSON-serializable dict:
`{"clean": {"accuracy", "expected_calibration_error"}, "corruptions":
{name: {"1": {...}, ..., "5": {...}, "mean": {...}}}, "mean": {...}}`, where
a corruption's "mean" averages its severities and the top-level "mean"
averages every corruption and severity (mean corruption accuracy, the
usual CIFAR-10-C summary).

The corruptions run in one `tf.function` (chosen inside it by
`tf.switch_case`, so it is traced once, not once per corruption), the
model on its Keras backend (`topk_sparse.backend.compiled`): TensorFlow or
JAX.
Every pass calls the model, which updates the activation-sparsity metrics
of its `SparseMLP` / `TopKActivation` layers; their state is restored
afterwards (`sparsity.metrics_restored`), so a `SparsityCallback` or `fit`
history is not polluted by these passes.
"""

import keras
import numpy as np
import tensorflow as tf

from topk_sparse import backend, checks, sparsity
from topk_sparse.calibration import NUM_BINS, ExpectedCalibrationError
from topk_sparse.data import corruptions as corruptions_lib
from topk_sparse.data import images as images_lib

METRICS = ("accuracy", "expected_calibration_error")
"""The two numbers of every pass, as named in results and tags."""


def _check_corruptions(names, valid):
    if isinstance(names, str):
        names = (names,)
    names = tuple(valid) if names is None else tuple(names)
    unknown = [name for name in names if name not in valid]
    if not names or unknown:
        raise ValueError(
            f"corruptions must be a non-empty list of names from "
            f"{tuple(valid)}, got {names!r}.")
    return names


def _check_severities(severities):
    severities = tuple(severities)
    if not severities or len(set(severities)) != len(severities):
        raise ValueError(
            f"severities must be distinct ints from 1 to 5, got "
            f"{severities!r}.")
    return tuple(corruptions_lib.check_severity(s) for s in severities)


def check_arguments(corruptions, severities):
    """Raises `ValueError` for unknown corruptions or severities, so that a
    training run can fail before it trains rather than after."""
    _check_corruptions(corruptions, corruptions_lib.CORRUPTIONS)
    _check_severities(severities)


class _Scorer:
    """Accuracy and ECE of `model` on a dataset seen through one of
    `transforms` (`fn(images, seed) -> images`): the transform in one
    `tf.function`, the model compiled on its backend."""

    def __init__(self, model, transforms, num_bins, seed):
        self.transforms = transforms
        self.seed = seed
        self.accuracy = keras.metrics.SparseCategoricalAccuracy()
        self.ece = ExpectedCalibrationError(num_bins, from_logits=True)
        self._predict = backend.compiled(
            lambda images: model(images, training=False), model)
        self._transform = None

    def _compile(self, images):
        """Traces `_corrupt` once, for any batch size (tracing all the
        corruption branches takes seconds)."""
        images = tf.convert_to_tensor(images)
        spec = tf.TensorSpec([None, *images.shape[1:]], images.dtype)
        scalar = tf.TensorSpec([], tf.int32)
        # No AutoGraph: there is no Python control flow on tensors to convert.
        self._transform = tf.function(
            self._corrupt, autograph=False,
            input_signature=[spec, scalar, scalar])

    def _corrupt(self, images, transform, batch_index):
        seed = tf.stack([tf.constant(self.seed, tf.int64),
                         tf.cast(batch_index, tf.int64)])
        return tf.switch_case(transform, [
            lambda fn=fn: fn(images, seed) for fn in self.transforms])

    def __call__(self, dataset, transform=0):
        self.accuracy.reset_state()
        self.ece.reset_state()
        batches = 0
        for batch in dataset:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                kind = type(batch).__name__
                if isinstance(batch, (tuple, list)):
                    kind += f" of {len(batch)} items"
                raise ValueError(
                    f"The dataset must yield (images, labels) batches, got a "
                    f"{kind}.")
            images, labels = batch
            if self._transform is None:
                self._compile(images)
            logits = self._predict(np.asarray(self._transform(
                images, tf.constant(transform), tf.constant(batches))))
            self.accuracy.update_state(np.asarray(labels), logits)
            self.ece.update_state(np.asarray(labels), logits)
            batches += 1
        if not batches:
            raise ValueError("The dataset yielded no batches.")
        return {"accuracy": float(self.accuracy.result()),
                "expected_calibration_error": float(self.ece.result())}


def _mean(scores):
    return {m: float(np.mean([s[m] for s in scores])) for m in METRICS}


def _evaluate(model, passes, clean, corrupted):
    """Runs `clean()` and `corrupted(name, severity)` for each pass, with
    the model's metric state restored afterwards; returns the result dict."""
    with sparsity.metrics_restored(model):
        result = {"clean": clean(), "corruptions": {}}
        for name, severities in passes:
            scores = {str(s): corrupted(name, s) for s in severities}
            scores["mean"] = _mean(list(scores.values()))
            result["corruptions"][name] = scores
    result["mean"] = _mean([score for scores in result["corruptions"].values()
                            for key, score in scores.items() if key != "mean"])
    return result


def evaluate_corruptions(model, dataset, corruptions=None,
                         severities=corruptions_lib.SEVERITIES,
                         num_bins=NUM_BINS, seed=0):
    """Accuracy and ECE of `model` on `dataset`, clean and corrupted.

    Args:
      model: a Keras classifier whose outputs are logits `[batch, classes]`.
      dataset: iterable of `(images, labels)` batches (e.g. a `tf.data`
        evaluation split): float images `[batch, height, width, 1 or 3]` in
        [0, 1], int labels `[batch]`. It is read once per pass.
      corruptions: names from `topk_sparse.data.corruptions.CORRUPTIONS`;
        None means all of them.
      severities: ints from 1 to 5.
      num_bins: int. Bins of the expected calibration error.
      seed: int. Batch `i` is corrupted with the stateless seed
        `(seed, i)` (see `corrupt`).

    Returns:
      The result dict described in the module docstring.

    Example:
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)), keras.layers.Flatten(),
    ...     keras.layers.Dense(3)])
    >>> data = [(np.random.rand(4, 8, 8, 1).astype("float32"),
    ...          np.array([0, 1, 2, 0]))]
    >>> result = evaluate_corruptions(model, data, ["contrast"], [1, 5])
    >>> sorted(result["corruptions"]["contrast"])
    ['1', '5', 'mean']
    """
    names = _check_corruptions(corruptions, corruptions_lib.CORRUPTIONS)
    severities = _check_severities(severities)
    seed = checks.integer(seed, "seed")
    cases = [(name, s) for name in names for s in severities]
    transforms = [lambda images, seed: images] + [
        lambda images, seed, name=name, s=s: corruptions_lib.corrupt(
            images, name, s, seed) for name, s in cases]
    scorer = _Scorer(model, transforms, num_bins, seed)
    return _evaluate(
        model, [(name, severities) for name in names], lambda: scorer(dataset),
        lambda name, s: scorer(dataset, 1 + cases.index((name, s))))


def evaluate_cifar10_c(model, batch_size, data_dir=None, corruptions=None,
                       severities=corruptions_lib.SEVERITIES,
                       num_bins=NUM_BINS, image_size=None):
    """`evaluate_corruptions`' result on the published CIFAR-10-C records.

    Needs TFDS `cifar10` and each `cifar10_corrupted/<name>_<severity>`
    prepared in `data_dir` (nothing is downloaded; a missing one raises
    `FileNotFoundError` naming it).

    Args:
      model: a Keras classifier of CIFAR-10 images with logits out.
      batch_size: int. Evaluation batch size.
      data_dir: str or None. TFDS data folder; None is TFDS's default.
      corruptions: names from `corruptions.TFDS_CORRUPTIONS`; None means the
        ones `evaluate_corruptions` computes on the fly (`CORRUPTIONS`).
      severities: ints from 1 to 5.
      num_bins: int. Bins of the expected calibration error.
      image_size: int or None. Resize images to the model's input size.
    """
    valid = (*corruptions_lib.TFDS_CORRUPTIONS,
             *corruptions_lib.TFDS_ALIASES)
    names = _check_corruptions(
        tuple(corruptions_lib.CORRUPTIONS) if corruptions is None
        else corruptions, valid)
    severities = _check_severities(severities)
    scorer = _Scorer(model, [lambda images, seed: images], num_bins, 0)

    def clean():
        return scorer(images_lib.load("cifar10", "test", batch_size,
                                      train=False, image_size=image_size,
                                      data_dir=data_dir)[0])

    def corrupted(name, severity):
        return scorer(corruptions_lib.load_cifar10_corrupted(
            name, severity, batch_size, data_dir, image_size)[0])

    return _evaluate(model, [(name, severities) for name in names], clean,
                     corrupted)


def format_table(result):
    """The result as text: a row per corruption, a column per severity.

    Cells are `accuracy/ECE` in percent; the last row averages the
    corruptions, the last column the severities.
    """
    if not {"clean", "corruptions", "mean"} <= set(result):
        raise ValueError(
            "format_table takes the dict evaluate_corruptions returns, with "
            f"keys 'clean', 'corruptions' and 'mean'; got {sorted(result)}.")

    def cell(score):
        return (f"{100 * score['accuracy']:.1f}/"
                f"{100 * score['expected_calibration_error']:.1f}")

    rows = result["corruptions"]
    columns = sorted({key for scores in rows.values() for key in scores
                      if key != "mean"}, key=int) + ["mean"]
    mean_row = {c: _mean([scores[c] for scores in rows.values()])
                for c in columns[:-1]}
    mean_row["mean"] = result["mean"]
    width = max([len("corruption")] + [len(name) for name in rows])
    lines = [
        f"clean: {cell(result['clean'])}   (accuracy/ECE, %)",
        f"{'corruption':<{width}}" + "".join(f"{c:>12}" for c in columns)]
    for name, scores in [*rows.items(), ("mean", mean_row)]:
        lines.append(f"{name:<{width}}" + "".join(
            f"{cell(scores[c]) if c in scores else '-':>12}"
            for c in columns))
    return "\n".join(lines)


def write_summaries(result, log_dir, step):
    """Writes the result's means as TensorBoard scalars at `step`.

    Tags: `robustness/clean/<metric>`, `robustness/<corruption>/<metric>`
    (mean over severities) and `robustness/mean/<metric>`, for the metrics
    `accuracy` and `expected_calibration_error`; one file writer.
    """
    scores = {"clean": result["clean"], "mean": result["mean"]}
    scores.update({name: s["mean"] for name, s in
                   result["corruptions"].items()})
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        for name, score in scores.items():
            for metric in METRICS:
                tf.summary.scalar(f"robustness/{name}/{metric}",
                                  score[metric], step=step)
    writer.close()
