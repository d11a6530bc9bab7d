"""Keras callbacks writing activation sparsity and calibration to TensorBoard.

*The Lazy Neuron Phenomenon* (arXiv 2210.06313) is about two numbers that
`model.fit` does not show well: the share of MLP activations that are nonzero
(about 3% in T5-Base, 6.3% in ViT-B/16) and how well calibrated the
resulting classifier is (Table 1: Top-k lowers ViT's ECE from 8.42 to 7.48).

- `SparsityCallback` reads the `NonzeroFraction` metric that every
  `SparseMLP` / `TopKActivation` owns (`layer.nonzero_fraction`) and
  writes, per layer,
  `sparsity/<layer>/nonzero_fraction`, `sparsity/<layer>/dead_fraction` and
  the histograms `sparsity/<layer>/neuron_fire_rate` and
  `sparsity/<layer>/token_nonzero_fraction`, plus
  `sparsity/mean_nonzero_fraction` and `sparsity/mean_dead_fraction`.
  Use it with this module's `TensorBoard` (Keras's, less the layers'
  nonzero fractions), so that each reaches TensorBoard once.
- `CalibrationCallback` runs the model over held-out data and writes
  `calibration/expected_calibration_error`, `.../negative_log_likelihood`,
  `.../brier_score`, `.../accuracy` and the reliability diagram as the image
  `calibration/reliability_diagram`.

Both write against `model.optimizer.iterations` through one file writer each,
flush after every write, and add their headline numbers to the epoch `logs`
(so History and the progress bar show them). Values come from the metrics'
sum variables read outside the replica context, where `MirroredStrategy` /
`TPUStrategy` add the replicas' states: never from per-batch logs, which
Keras 3.15 averages over replicas.

Two Keras 3.15 behaviours shape the code (seen in `fit`'s source):
`fit` runs validation before `on_epoch_end` and `evaluate` resets every layer
metric, so the training sparsity is saved in `on_test_begin`; and a layer's
metric counts every call of the layer, so the calibration pass restores the
layers' metric variables after each batch, on each replica.

Example:

    model.fit(data, epochs=10, callbacks=[
        topk_sparse.callbacks.SparsityCallback("logs/sparsity"),
        topk_sparse.callbacks.CalibrationCallback("logs/calibration",
                                                  val_data),
    ])
"""

import os

import keras
import numpy as np
from tensorboard.plugins.histogram import metadata as histogram_metadata
import tensorflow as tf

from topk_sparse import backend, checks, sparsity
from topk_sparse.calibration import (NUM_BINS, BrierScore,
                                     ExpectedCalibrationError,
                                     NegativeLogLikelihood,
                                     reliability_diagram_image)

_HISTOGRAM_METADATA = histogram_metadata.create_summary_metadata(
    display_name=None, description=None)


def _histogram_buckets(values, weights=None, num_buckets=30):
    """TensorBoard histogram buckets of `values`, each counted `weights`
    times (None: once).

    The `[buckets, 3]` (left edge, right edge, count) tensor that
    `tf.summary.histogram` writes, from values with multiplicities: a
    histogram over millions of tokens from their few distinct values.
    """
    values = np.asarray(values, np.float64).reshape(-1)
    weights = np.ones_like(values) if weights is None else np.asarray(
        weights, np.float64).reshape(-1)
    if values.size == 0:
        return np.zeros((num_buckets, 3))
    low, high = values.min(), values.max()
    if low == high:
        return np.array([[low, high, weights.sum()]])
    edges = np.linspace(low, high, num_buckets + 1)
    totals, _ = np.histogram(values, bins=edges, weights=weights)
    return np.stack([edges[:-1], edges[1:], totals], axis=1)


class _SummaryCallback(keras.callbacks.Callback):
    """One file writer per training run, steps from the optimizer."""

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = os.fspath(log_dir)
        self._writer = None

    def on_train_begin(self, logs=None):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _step(self):
        return int(self.model.optimizer.iterations.numpy())

    def _write(self, step, scalars, histograms=None, images=None):
        with self._writer.as_default(step=step):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value)
            for tag, (values, weights) in (histograms or {}).items():
                tf.summary.write(tag, _histogram_buckets(values, weights),
                                 metadata=_HISTOGRAM_METADATA)
            for tag, value in (images or {}).items():
                tf.summary.image(tag, value)
        self._writer.flush()


def nonzero_fractions(model):
    """`{MLP name: NonzeroFraction}` of the model's MLPs that measure their
    sparsity (`sparsity.sparse_mlps`, built, `track_sparsity=True`): the
    name is the path of their tags and report entries, as it is of their
    key in `fit` logs.

    Raises:
      ValueError: if no MLP measures its sparsity, or two share a name.
    """
    found = {name: mlp.nonzero_fraction
             for name, mlp in sparsity.sparse_mlps(model).items()
             if mlp.nonzero_fraction is not None}
    if not found:
        raise ValueError(
            f"Model {model.name!r} has no layer that owns a NonzeroFraction "
            f"metric (a built SparseMLP or TopKActivation with "
            f"track_sparsity=True), so there is no sparsity to write.")
    return found


class TensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` less the layers' nonzero fractions.

    Every `SparseMLP` / `TopKActivation` puts `<layer>/nonzero_fraction`
    into the `fit` logs, which Keras's callback would write beside
    `SparsityCallback`'s `sparsity/<layer>/nonzero_fraction`: with this one
    each value reaches TensorBoard once. Same arguments as Keras's.
    """

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, _without_nonzero(logs))

    def on_test_end(self, logs=None):
        super().on_test_end(_without_nonzero(logs))

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, _without_nonzero(logs))


def _without_nonzero(logs):
    if not isinstance(logs, dict):
        return logs
    return {k: v for k, v in logs.items()
            if not k.endswith(sparsity.NONZERO_SUFFIX)}


class SparsityCallback(_SummaryCallback):
    """Writes the activation sparsity of every Top-k / sparse MLP layer.

    For each layer (`<layer>`: its name, as in the `fit` logs):
    `sparsity/<layer>/nonzero_fraction` (the share of hidden activations that
    are nonzero, per token, the measure of the Lazy Neuron paper),
    `sparsity/<layer>/dead_fraction` (share of neurons that never fired) and,
    with `histograms=True`, the histograms `sparsity/<layer>/neuron_fire_rate`
    (per neuron, the share of tokens it fired on) and
    `sparsity/<layer>/token_nonzero_fraction` (per token, the share of
    neurons that fired: the distribution behind `nonzero_fraction`); and
    over layers
    `sparsity/mean_nonzero_fraction` and `sparsity/mean_dead_fraction`.

    Keras resets the layers' metrics at the start of every epoch, so each
    value covers the training batches of the epoch so far. At epoch end,
    `logs["mean_nonzero_fraction"]` and `logs["mean_dead_fraction"]` are
    added for History and the progress bar.

    Args:
      log_dir: str or path. Directory of the TensorBoard event file.
      update_freq: `"epoch"` (default) writes at the end of every epoch; an
        int `n` also writes every `n` optimizer steps.
      histograms: bool. Whether to write the two histograms. Defaults to
        True.

    Example:
    >>> callback = SparsityCallback("/tmp/logs", update_freq=100)
    >>> model.fit(x, y, callbacks=[callback])  # doctest: +SKIP

    References:
      - Li et al., The Lazy Neuron Phenomenon, https://arxiv.org/abs/2210.06313
    """

    def __init__(self, log_dir, update_freq="epoch", histograms=True):
        super().__init__(log_dir)
        if update_freq != "epoch":
            update_freq = checks.positive_int(
                update_freq, "update_freq ('epoch' or a number of optimizer "
                "steps)")
        self.update_freq = update_freq
        self.histograms = bool(histograms)
        self._metrics = None
        self._in_fit = False
        self._training_state = None
        self._last_write = None

    def on_train_begin(self, logs=None):
        # Found after the first batch: a subclassed model builds its layers
        # (and their metrics) in its first train step.
        self._metrics = None
        super().on_train_begin(logs)
        self._in_fit = True
        self._last_write = None

    def on_train_end(self, logs=None):
        self._in_fit = False
        super().on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._training_state = None

    def on_train_batch_end(self, batch, logs=None):
        self._find_layers()
        if self.update_freq == "epoch":
            return
        step = self._step()
        # "Passed a multiple of n" rather than "is a multiple": with
        # steps_per_execution > 1 the step jumps by more than one.
        previous = 0 if self._last_write is None else self._last_write
        if step // self.update_freq > previous // self.update_freq:
            self._summarize(step, self._read())

    def on_test_begin(self, logs=None):
        # `fit`'s validation resets the layer metrics before `on_epoch_end`:
        # keep the training counts.
        if self._in_fit:
            self._find_layers()
            self._training_state = self._read()

    def on_epoch_end(self, epoch, logs=None):
        self._find_layers()
        state = self._training_state or self._read()
        self._training_state = None
        step = self._step()
        # With an int update_freq the last batch may have written this step.
        summary = self._summarize(step, state, write=step != self._last_write)
        if logs is not None:
            for name in ("mean_nonzero_fraction", "mean_dead_fraction"):
                if name in summary:
                    logs[name] = summary[name]

    def _find_layers(self):
        if self._metrics is None:
            self._metrics = nonzero_fractions(self.model)

    def _read(self):
        """Numpy copies of each layer's counts, summed over replicas."""
        return {
            path: (float(metric.token_count.numpy()),
                   float(metric.nonzero_count.numpy()),
                   np.asarray(metric.neuron_fire_count.numpy()),
                   metric.token_nonzero_fractions())
            for path, metric in self._metrics.items()
        }

    def _summarize(self, step, state, write=True):
        scalars, histograms = {}, {}
        nonzero, dead = [], []
        for path, (tokens, nonzero_count, fire_count,
                   token_fractions) in state.items():
            if tokens == 0:  # not called since the last reset: nothing to say
                continue
            nonzero.append(nonzero_count / (tokens * fire_count.size))
            dead.append(float(np.mean(fire_count == 0)))
            scalars[f"sparsity/{path}/nonzero_fraction"] = nonzero[-1]
            scalars[f"sparsity/{path}/dead_fraction"] = dead[-1]
            if self.histograms:
                histograms[f"sparsity/{path}/neuron_fire_rate"] = (
                    fire_count / tokens, None)
                histograms[f"sparsity/{path}/token_nonzero_fraction"] = (
                    token_fractions)
        summary = {}
        if nonzero:
            summary = {"mean_nonzero_fraction": float(np.mean(nonzero)),
                       "mean_dead_fraction": float(np.mean(dead))}
            scalars.update({f"sparsity/{name}": value
                            for name, value in summary.items()})
        if write and scalars:
            self._write(step, scalars, histograms)
            self._last_write = step
        return summary


def _validation_dataset(validation_data, batch_size):
    """`validation_data` as a batched tf.data of `(x, y[, sample_weight])`."""
    if isinstance(validation_data, tf.data.Dataset):
        dataset = validation_data
    elif isinstance(validation_data, (tuple, list)) and \
            len(validation_data) in (2, 3):
        dataset = tf.data.Dataset.from_tensor_slices(
            tuple(validation_data)).batch(batch_size)
    else:
        raise ValueError(
            f"validation_data must be a tf.data.Dataset of (x, y) or "
            f"(x, y, sample_weight) batches, or a tuple (x, y) or "
            f"(x, y, sample_weight) of arrays, got "
            f"{type(validation_data).__name__}.")
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(
            f"validation_data must yield (x, y) or (x, y, sample_weight) "
            f"batches: labels are needed for calibration. Its elements are "
            f"{spec}.")
    return dataset


class CalibrationCallback(_SummaryCallback):
    """Writes the model's calibration on held-out data every `freq` epochs.

    At the end of every `freq`-th epoch the model runs over
    `validation_data` (with `training=False`; on TensorFlow through the
    model's distribution strategy, compiled with XLA when the model is; on
    JAX under `jax.jit`) and
    `calibration/expected_calibration_error`,
    `calibration/negative_log_likelihood`, `calibration/brier_score`,
    `calibration/accuracy` (top-1) and the image
    `calibration/reliability_diagram` (Guo et al. 2017, Figure 1) are
    written. The epoch `logs` get the same numbers as
    `val_expected_calibration_error`, `val_negative_log_likelihood`,
    `val_brier_score` and, unless `fit`'s own validation already put one
    there, `val_accuracy`.

    The pass leaves the layers' own metrics (such as `layer.nonzero_fraction`) as it
    found them, so `SparsityCallback` reports training batches only.

    Args:
      log_dir: str or path. Directory of the TensorBoard event file.
      validation_data: a `tf.data.Dataset` of `(x, y)` or
        `(x, y, sample_weight)` batches, or such a tuple of arrays. Labels
        are sparse class ids or one-hot.
      num_bins: int. Equal-width confidence bins of the ECE. Defaults to
        `calibration.NUM_BINS` (15).
      from_logits: bool. Whether the model outputs logits. Defaults to True.
      freq: int. Run every `freq` epochs. Defaults to 1.
      batch_size: int. Batch size when `validation_data` is arrays.
        Defaults to 32.

    Example:
    >>> callback = CalibrationCallback("/tmp/logs", (x_val, y_val))
    >>> model.fit(x, y, callbacks=[callback])  # doctest: +SKIP

    References:
      - Guo et al., On Calibration of Modern Neural Networks,
        https://arxiv.org/abs/1706.04599
      - Li et al., The Lazy Neuron Phenomenon, https://arxiv.org/abs/2210.06313
    """

    def __init__(self, log_dir, validation_data, num_bins=NUM_BINS,
                 from_logits=True,
                 freq=1, batch_size=32):
        super().__init__(log_dir)
        self.num_bins = checks.positive_int(num_bins, "num_bins")
        self.from_logits = bool(from_logits)
        self.freq = checks.positive_int(freq, "freq")
        batch_size = checks.positive_int(batch_size, "batch_size")
        self._dataset = _validation_dataset(validation_data, int(batch_size))
        self._built_for = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.freq:
            return
        results, image = self.evaluate()
        self._write(self._step(),
                    {f"calibration/{name}": value
                     for name, value in results.items()},
                    images={"calibration/reliability_diagram": image})
        if logs is not None:
            for name, value in results.items():
                if name != "accuracy" or "val_accuracy" not in logs:
                    logs[f"val_{name}"] = value

    def evaluate(self):
        """Runs the model over the validation data.

        Returns:
          `(results, image)`: a dict of the four calibration numbers and the
          reliability diagram as a `[1, H, W, 3]` uint8 array.
        """
        self._build()
        for metric in self._metrics:
            metric.reset_state()
        for batch in self._distributed_dataset:
            self._step_function(batch)
        ece, nll, brier = self._metrics
        # The ECE's bins also hold the top-1 hits: accuracy for free, with
        # the same label handling and sample weights.
        count = float(np.sum(ece.bin_count.numpy()))
        hits = float(np.sum(ece.bin_accuracy.numpy()))
        results = {
            "expected_calibration_error": float(ece.result()),
            "negative_log_likelihood": float(nll.result()),
            "brier_score": float(brier.result()),
            "accuracy": hits / count if count else 0.0,
        }
        return results, reliability_diagram_image(ece.reliability_diagram())

    def _build(self):
        """Metrics and step function, once per model."""
        if self._built_for is self.model:
            return
        if keras.config.backend() == "jax":
            self._build_jax()
            return
        model = self.model
        strategy = model.distribute_strategy
        # Under the model's strategy the metric sums become SyncOnRead
        # variables, added up when read here, outside the replicas.
        with strategy.scope():
            self._metrics = [
                ExpectedCalibrationError(self.num_bins, self.from_logits),
                NegativeLogLikelihood(self.from_logits),
                BrierScore(self.from_logits),
            ]
        # The model's metrics, its layers' sparsity included (compiled ones
        # are not updated by this pass; restoring them is a no-op).
        layer_variables = sparsity.metric_state(model)
        metrics = self._metrics

        def replica_step(batch):
            x, y, sample_weight = (*batch, None)[:3]
            # A layer's metric counts every call; this pass is not training.
            saved = [tf.identity(v.value) for v in layer_variables]
            y_pred = model(x, training=False)
            for metric in metrics:
                metric.update_state(y, y_pred, sample_weight=sample_weight)
            for variable, value in zip(layer_variables, saved):
                variable.assign(value)

        # Keras' own step structure: XLA inside the replica, only when the
        # model's steps use it (Keras resolves "auto" to off under
        # tf.distribute and on CPU-only hosts).
        if model.jit_compile and not model.run_eagerly:
            replica_step = tf.function(replica_step, jit_compile=True,
                                       reduce_retracing=True)

        def step_function(batch):
            strategy.run(replica_step, args=(batch,))

        if not model.run_eagerly:
            step_function = tf.function(step_function, reduce_retracing=True)

        self._step_function = step_function
        self._distributed_dataset = strategy.experimental_distribute_dataset(
            self._dataset)
        self._built_for = model

    def _build_jax(self):
        """The JAX step: the model compiled by `jax.jit` over its
        variables, wherever `keras.distribution` placed them
        (`backend.compiled`), the metrics updated on its outputs; the
        layers' counts it adds are put back (`sparsity.metrics_restored`)."""
        model = self.model
        self._metrics = [
            ExpectedCalibrationError(self.num_bins, self.from_logits),
            NegativeLogLikelihood(self.from_logits),
            BrierScore(self.from_logits),
        ]
        predict = backend.compiled(lambda x: model(x, training=False), model)
        metrics = self._metrics

        def step_function(batch):
            x, y, sample_weight = (*(np.asarray(b) for b in batch), None)[:3]
            with sparsity.metrics_restored(model):
                y_pred = predict(x)
            for metric in metrics:
                metric.update_state(y, y_pred, sample_weight=sample_weight)

        self._step_function = step_function
        self._distributed_dataset = self._dataset
        self._built_for = model
