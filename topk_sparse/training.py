"""The train/evaluate routine the binaries call: `train(config, workdir)`.

Top to bottom, as in big_vision's trainers:

    strategy -> input pipeline -> model and optimizer (in strategy.scope())
    -> callbacks (TensorBoard, BackupAndRestore, NaN guard) -> model.fit
    -> evaluate -> report

The workdir gets `config.json` (at the start), `tensorboard/` (every `fit`
log, the MLPs' `<layer>/nonzero_fraction` and the calibration error included;
`tensorboard/sparsity/` adds per-MLP dead fractions and neuron firing
histograms, `topk_sparse.callbacks.SparsityCallback`), `backup/` (the
training state after every epoch: a killed run started again with the same
workdir resumes from its last finished epoch), `report.json` and
`model.keras` (at the end).

`config` is an `ml_collections.ConfigDict` from a `configs/*.py` file; see
`configs/vit_digits.py` for every key.
"""

import json
import math
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from topk_sparse import (calibration, callbacks, data, distribute,
                         robustness, scoring)
from topk_sparse.data import corruptions as corruptions_lib

MODELS = ("vit", "t5")

# Bins of the expected calibration error, as in the paper's Table 1 (15, the
# common default: the paper does not publish its count).
NUM_BINS = 15


def train(config, workdir, strategy=None):
    """Trains and evaluates the model `config` describes; returns the report.

    Args:
      config: ml_collections.ConfigDict. A training config (configs/*.py).
      workdir: str. Folder for config.json, TensorBoard logs, the backup,
        report.json and model.keras; a run started again with the same
        workdir resumes from its backup.
      strategy: tf.distribute.Strategy or None. None builds the strategy
        `config.strategy` names with `distribute.get_strategy`.

    Returns:
      The report (a dict), also written to `<workdir>/report.json`.
    """
    start = time.time()
    if config.model.name not in MODELS:
        raise ValueError(
            f"Unknown config.model.name {config.model.name!r}: choose one of "
            f"{MODELS}.")
    corruptions = tuple(config.eval.get("corruptions") or ())
    if corruptions:
        robustness.check_arguments(corruptions, config.eval.severities)
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())
    keras.utils.set_random_seed(config.seed)

    # === Strategy ===
    if strategy is None:
        strategy = distribute.get_strategy(
            config.strategy, tpu=config.tpu,
            num_cpu_devices=config.get("num_cpu_devices"))
    distribute.per_replica_batch(config.batch_size, strategy)
    jit_compile = _jit_compile(config.jit_compile, strategy)

    # === Input pipeline ===
    train_data, num_train = data.load(
        config.data, "train", config.batch_size, train=True, seed=config.seed)
    eval_data, _ = data.load(
        config.data, "test", config.eval.batch_size, train=False,
        seed=config.seed)
    steps_per_epoch = config.steps_per_epoch or (
        num_train // config.batch_size if num_train else None)
    if not steps_per_epoch:
        raise ValueError(
            f"config.steps_per_epoch must be set for {config.data.name!r}, "
            f"whose training stream has no fixed size.")
    total_steps = config.epochs * steps_per_epoch

    # === Model and optimizer ===
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    try:
        with strategy.scope():
            model = _make_model(config.model, config.data, train_data)
            if not model.built:  # BackupAndRestore needs the variables
                model(next(iter(train_data))[0])
            model.compile(
                optimizer=_make_optimizer(config.optimizer, total_steps),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                **_metrics(config.model.name),
                jit_compile=jit_compile,
                steps_per_execution=config.steps_per_execution)
            # Optimizer variables made now, not in the first traced step:
            # a tf.function that creates variables is traced twice.
            model.optimizer.build(model.trainable_variables)
        two_stage = config.eval.two_stage
        if two_stage.rank:  # its arguments fail now, not after training
            _check_two_stage(model, two_stage)

        # === Callbacks ===
        fit_callbacks = [
            # First: raise before a backup could save the diverged weights.
            FailOnNonFiniteLoss(),
            keras.callbacks.BackupAndRestore(
                os.path.join(workdir, "backup"), double_checkpoint=True,
                # Kept, so that starting a finished run again only evaluates.
                delete_checkpoint=False),
            keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard")),
            # Per MLP: nonzero and dead fractions, neuron firing histograms.
            callbacks.SparsityCallback(
                os.path.join(workdir, "tensorboard", "sparsity")),
        ]
        if config.model.name == "vit" and config.eval.every_epochs:
            # ECE, NLL, Brier score and the reliability diagram.
            fit_callbacks.append(callbacks.CalibrationCallback(
                os.path.join(workdir, "tensorboard", "calibration"),
                eval_data, num_bins=NUM_BINS,
                freq=config.eval.every_epochs))

        # === Fit ===
        train_start = time.time()
        history = model.fit(
            train_data, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
            validation_data=eval_data if config.eval.every_epochs else None,
            validation_freq=config.eval.every_epochs or 1,
            callbacks=fit_callbacks, verbose=config.verbose,
            shuffle=False)  # the input pipeline shuffles
        train_time = time.time() - train_start

        # === Evaluate ===
        metrics = model.evaluate(eval_data, return_dict=True, verbose=0)
        if config.eval.get("generate_examples"):
            metrics["exact_match"] = exact_match(
                model, eval_data, config.eval.generate_examples)
        # Accuracy and calibration under input corruptions (these passes
        # leave the layers' sparsity metrics as evaluate left them).
        corrupted = {}
        if corruptions:
            corrupted["robustness"] = robustness.evaluate_corruptions(
                model, eval_data, corruptions, config.eval.severities,
                num_bins=NUM_BINS, seed=config.seed)
        if config.eval.get("cifar10_corrupted"):
            corrupted["cifar10_corrupted"] = robustness.evaluate_cifar10_c(
                model, config.eval.batch_size,
                data_dir=config.data.get("data_dir"),
                corruptions=corruptions_lib.BENCHMARK_CORRUPTIONS,
                severities=config.eval.severities, num_bins=NUM_BINS,
                image_size=config.data.get("image_size"))
        for name, result in corrupted.items():
            robustness.write_summaries(
                result, os.path.join(workdir, "tensorboard", name),
                int(model.optimizer.iterations.numpy()))
        measured_scoring = {}
        if two_stage.rank:
            measured_scoring["two_stage"] = _measure_two_stage(
                model, two_stage, train_data, eval_data,
                os.path.join(workdir, "tensorboard", "two_stage"))
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    # === Report ===
    sparsity = {path: mlp.nonzero_fraction
                for path, mlp in model.sparse_mlps().items()
                if mlp.nonzero_fraction is not None}
    nonzero = {path: float(m.result()) for path, m in sparsity.items()}
    report = {
        "model": config.model.name,
        "dataset": config.data.name,
        # Share of training labels replaced by a uniformly drawn class.
        "label_noise": float(config.data.get("label_noise", 0.0)),
        "k": config.model.k,
        "strategy": type(strategy).__name__.lstrip("_"),
        "replicas": strategy.num_replicas_in_sync,
        "jit_compile": jit_compile,
        "num_params": model.count_params(),
        "epochs": config.epochs,
        # The epochs this run trained: fewer than `epochs` when it resumed.
        "epochs_run": list(history.epoch),
        "steps_per_epoch": steps_per_epoch,
        "train_steps": int(model.optimizer.iterations.numpy()),
        "eval": {name: float(value) for name, value in metrics.items()
                 if "nonzero_fraction" not in name},
        # Measured on the evaluation split, the paper's per-token share.
        "nonzero_fraction": nonzero,
        "mean_nonzero_fraction": float(np.mean(list(nonzero.values())))
        if nonzero else None,
        # Neurons that never fired on the evaluation split.
        "dead_fraction": {path: float(m.dead_fraction())
                          for path, m in sparsity.items()},
        # Per corruption and severity: accuracy and ECE, as in the paper's
        # Table 1 robustness columns.
        **corrupted,
        # Two-stage scoring's recall and output cosine, if asked for.
        **measured_scoring,
        "history": {name: [float(v) for v in values]
                    for name, values in history.history.items()},
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.time() - start, 2),
    }
    _write_json(os.path.join(workdir, "report.json"), report)
    print(format_report(report, workdir), flush=True)
    model.save(os.path.join(workdir, "model.keras"))
    return report


def _check_two_stage(model, two_stage):
    if any(mlp.k is None for mlp in model.sparse_mlps().values()):
        raise ValueError(
            f"config.eval.two_stage.rank={two_stage.rank} needs Top-k MLPs: "
            f"set config.model.k, or rank 0 for the dense model.")
    for mlp in model.sparse_mlps().values():
        mlp.check_scoring(two_stage.rank, two_stage.candidates)
    if two_stage.examples <= 0:
        raise ValueError(f"config.eval.two_stage.examples must be positive, "
                         f"got {two_stage.examples}.")


def _measure_two_stage(model, two_stage, train_data, eval_data, log_dir):
    """Calibrates two-stage scoring on training examples, measures it on
    test examples (`scoring.calibrate`); writes the means to TensorBoard.

    Returns `{"rank", "candidates", "recall", "cosine", "layers": {mlp
    path: {"recall", "cosine"}}}`, recall and cosine averaged over MLPs.
    """
    def examples(dataset):  # one batch of model inputs, labels dropped
        return dataset.unbatch().take(two_stage.examples).batch(
            two_stage.examples).map(lambda inputs, *labels: inputs)

    layers = scoring.calibrate(
        model, examples(train_data), two_stage.rank, two_stage.candidates,
        held_out=examples(eval_data))
    mlp = next(iter(model.sparse_mlps().values()))
    result = {"rank": two_stage.rank, "candidates": mlp.scorer.candidates,
              **{name: float(np.mean([m[name] for m in layers.values()]))
                 for name in ("recall", "cosine")},
              "layers": layers}
    writer = tf.summary.create_file_writer(log_dir)
    step = int(model.optimizer.iterations.numpy())
    with writer.as_default(step=step):
        for name in ("recall", "cosine"):
            tf.summary.scalar(f"two_stage/{name}", result[name])
    writer.close()
    return result


def exact_match(model, dataset, num_examples):
    """Share of examples whose greedy decoding equals the target sequence.

    Decodes about `num_examples` examples of `dataset` (whole batches of
    `(inputs, targets, weights)`) with `model.generate` for as many tokens
    as the targets have; positions where `weights` is 0 (after EOS) do not
    count.
    """
    # One traced graph for all batches instead of eager decoding steps.
    generate = tf.function(model.generate)
    correct = total = 0
    for inputs, targets, weights in dataset:
        if total >= num_examples:
            break
        predicted = np.asarray(generate(
            inputs["encoder_tokens"], max_length=targets.shape[1]))
        wrong = (predicted[:, :targets.shape[1]] != targets.numpy()) \
            & (weights.numpy() > 0)
        correct += int(np.sum(~wrong.any(axis=1)))
        total += len(targets)
    return correct / max(total, 1)


def _jit_compile(requested, strategy):
    """`requested`, except under MirroredStrategy over CPU devices.

    There XLA fails on variables placed on another logical device (an XLA
    known issue, seen here with Keras 3.15 / TensorFlow 2.20).
    """
    if requested and isinstance(strategy, tf.distribute.MirroredStrategy) \
            and strategy.num_replicas_in_sync > 1 and all(
                "CPU" in d.upper() for d in strategy.extended.worker_devices):
        logging.warning("jit_compile=False: XLA does not support "
                        "MirroredStrategy over CPU devices.")
        return False
    return bool(requested)


def _make_model(model_config, data_config, train_data):
    """The model `config.model` names, sized by the data it will read."""
    from topk_sparse import models

    kwargs = dict(model_config)
    name = kwargs.pop("name")
    if name == "vit":
        from topk_sparse.data import images

        images_spec = train_data.element_spec[0]
        _, height, _, channels = images_spec.shape
        return models.ViT(**kwargs, image_size=height, channels=channels,
                          num_classes=images.NUM_CLASSES[data_config.name])
    return models.T5(**kwargs, vocab_size=data.vocab_size(data_config))


def _metrics(model_name):
    """`compile` metric arguments. T5 batches carry per-token weights (0 on
    padding), which only `weighted_metrics` apply."""
    if model_name == "vit":
        # The loss is the negative log-likelihood: no metric repeats it.
        return {"metrics": [
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            calibration.ExpectedCalibrationError(num_bins=NUM_BINS,
                                                 from_logits=True),
            calibration.BrierScore(from_logits=True)]}
    return {"weighted_metrics": [keras.metrics.SparseCategoricalAccuracy(
        name="token_accuracy")]}


OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
SCHEDULES = ("cosine", "constant", "rsqrt")


def _make_optimizer(opt, total_steps):
    """Optimizer from `config.optimizer`: linear warmup, then the schedule."""
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"Unknown config.optimizer.name {opt.name!r}: "
                         f"choose one of {OPTIMIZERS}.")
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"Unknown config.optimizer.schedule "
                         f"{opt.schedule!r}: choose one of {SCHEDULES}.")
    learning_rate = _learning_rate(opt, total_steps)
    clip = {"global_clipnorm": opt.global_clipnorm} \
        if opt.global_clipnorm else {}
    if opt.name == "adafactor":  # T5's optimizer
        return keras.optimizers.Adafactor(learning_rate, **clip)
    if opt.name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=opt.momentum,
                                    nesterov=True, **clip)
    if opt.name == "adam":
        return keras.optimizers.Adam(learning_rate, beta_2=opt.beta_2, **clip)
    return keras.optimizers.AdamW(learning_rate, beta_2=opt.beta_2,
                                  weight_decay=opt.weight_decay, **clip)


def _learning_rate(opt, total_steps):
    """Linear warmup over `opt.warmup_steps`, then cosine decay to 0 by
    `total_steps` or a constant rate; or T5's `"rsqrt"`."""
    if opt.schedule == "rsqrt":
        return RsqrtSchedule(opt.learning_rate, opt.warmup_steps)
    warmup = min(opt.warmup_steps, total_steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else opt.learning_rate,
        decay_steps=max(total_steps - warmup, 1),
        # alpha=1 ends the decay where it starts: a constant rate.
        alpha=0.0 if opt.schedule == "cosine" else 1.0,
        warmup_target=opt.learning_rate if warmup else None,
        warmup_steps=warmup)


@keras.saving.register_keras_serializable(package="topk_sparse")
class RsqrtSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """T5's schedule: constant for `warmup_steps`, then `1/sqrt(step)`.

    `learning_rate * sqrt(warmup_steps / max(step, warmup_steps))`; T5
    (arXiv 1910.10683, Sec. 3.1.2) uses 0.01 and 10^4 steps, i.e.
    `1/sqrt(max(step, 10^4))`.
    """

    def __init__(self, learning_rate, warmup_steps):
        self.learning_rate = float(learning_rate)
        self.warmup_steps = max(int(warmup_steps), 1)

    def __call__(self, step):
        step = keras.ops.maximum(keras.ops.cast(step, "float32"),
                                 float(self.warmup_steps))
        return self.learning_rate * keras.ops.sqrt(self.warmup_steps / step)

    def get_config(self):
        return {"learning_rate": self.learning_rate,
                "warmup_steps": self.warmup_steps}


class FailOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises `FloatingPointError` as soon as the training loss is NaN or inf.

    Keras's `TerminateOnNaN` stops quietly; this names the optimizer steps
    between the last check that saw a finite loss and the failing one (with
    `steps_per_execution > 1` a check covers several steps).
    """

    def on_train_begin(self, logs=None):
        self._last_finite_step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        step = int(self.model.optimizer.iterations.numpy())
        if loss is None or math.isfinite(float(loss)):
            self._last_finite_step = step
            return
        raise FloatingPointError(
            f"Training loss became {float(loss)} between optimizer steps "
            f"{self._last_finite_step} (last finite) and {step}. The backup "
            f"holds the last finished epoch; lower the learning rate, add "
            f"warmup or clipping (config.optimizer) before resuming.")


def format_report(report, workdir):
    """A few lines for the log: final metrics and MLP activation sparsity."""
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in report["eval"].items())
    ran = report["epochs_run"]
    ran = f"epochs {ran[0] + 1}-{ran[-1] + 1} run here" if ran else \
        "no epoch left to run"
    noise = f" ({report['label_noise']:.0%} label noise)" \
        if report["label_noise"] else ""
    lines = [
        f"{report['model']} on {report['dataset']}{noise}, k={report['k']}: "
        f"{report['epochs']} epochs ({ran}), {report['train_steps']} steps, "
        f"{report['wall_time_s']:.0f}s, {report['strategy']} "
        f"x{report['replicas']}",
        f"  eval: {metrics}",
    ]
    if report["nonzero_fraction"]:
        lines.append(f"  nonzero fraction of MLP activations (eval): mean "
                     f"{report['mean_nonzero_fraction']:.4f}")
        lines += [f"    {path:<28} {value:.4f}"
                  for path, value in report["nonzero_fraction"].items()]
    for name in ("robustness", "cifar10_corrupted"):
        if name in report:
            lines.append(f"  {name}: accuracy / expected calibration error "
                         f"(%) by corruption and severity")
            lines += ["    " + line for line in
                      robustness.format_table(report[name]).splitlines()]
    if "two_stage" in report:
        two_stage = report["two_stage"]
        lines.append(
            f"  two-stage scoring (rank {two_stage['rank']}, "
            f"{two_stage['candidates']} candidates), mean over MLPs on test "
            f"tokens: recall of the exact top-k {two_stage['recall']:.4f}, "
            f"output cosine {two_stage['cosine']:.4f}")
    lines.append(f"  report: {os.path.join(workdir, 'report.json')}")
    return "\n".join(lines)


def _write_json(path, obj):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
