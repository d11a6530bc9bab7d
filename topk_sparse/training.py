"""The train/evaluate routine the binaries call: `train(config, workdir)`.

Top to bottom, as in big_vision's trainers:

    strategy -> input pipeline -> model and optimizer (in strategy.scope())
    -> callbacks (TensorBoard, BackupAndRestore, NaN guard, evaluators')
    -> model.fit -> evaluate and evaluators -> report

It names no model and no dataset: `config.model.name`, `config.data.name`
and the evaluations the config asks for are looked up in
`topk_sparse.registry`, where each declares what this routine needs.

The workdir gets `config.json` (at the start), `tensorboard/` (the `fit`
logs: loss and metrics; `tensorboard/sparsity/` has the MLPs' nonzero and
dead fractions and histograms, `topk_sparse.callbacks.SparsityCallback`;
evaluators add their own folders), `backup/` (the
training state after every epoch: a killed run started again with the same
workdir resumes from its last finished epoch), `report.json` and
`model.keras` (at the end).

`config` is an `ml_collections.ConfigDict` from a `configs/*.py` file; see
`configs/vit_digits.py` for every key.
"""

import dataclasses
import json
import math
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from topk_sparse import (callbacks, data, distribute, evaluation, models,
                         optimizers, registry)

del evaluation, models  # imported for their registrations


@dataclasses.dataclass(frozen=True)
class Run:
    """What an evaluator (`topk_sparse.registry.Evaluator`) sees of a run."""
    config: object
    model: keras.Model
    train_data: tf.data.Dataset
    eval_data: tf.data.Dataset
    workdir: str

    def step(self):
        """The optimizer step: the TensorBoard step of every summary."""
        return int(self.model.optimizer.iterations.numpy())


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
    spec = registry.lookup(registry.MODELS, config.model.name,
                           "config.model.name")
    evaluators = _evaluators(config, spec)
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
            model_kwargs = dict(config.model)
            del model_kwargs["name"]
            model = spec.build(model_kwargs, registry.DataSpec(
                train_data.element_spec, data.features(config.data)))
            if not model.built:  # BackupAndRestore needs the variables
                model(next(iter(train_data))[0])
            model.compile(
                optimizer=optimizers.make(config.optimizer, total_steps),
                loss=spec.loss(), **spec.metrics(), jit_compile=jit_compile,
                steps_per_execution=config.steps_per_execution)
            # Optimizer variables made now, not in the first traced step:
            # a tf.function that creates variables is traced twice.
            model.optimizer.build(model.trainable_variables)
        run = Run(config, model, train_data, eval_data, workdir)
        for evaluator in evaluators.values():  # fail now, not after training
            if evaluator.check:
                evaluator.check(run)

        # === Callbacks ===
        tensorboard = os.path.join(workdir, "tensorboard")
        fit_callbacks = [
            # First: raise before a backup could save the diverged weights.
            FailOnNonFiniteLoss(),
            keras.callbacks.BackupAndRestore(
                os.path.join(workdir, "backup"), double_checkpoint=True,
                # Kept, so that starting a finished run again only evaluates.
                delete_checkpoint=False),
            # Loss and metrics; the MLPs' sparsity is SparsityCallback's.
            callbacks.TensorBoard(tensorboard),
            # Per MLP: nonzero and dead fractions, neuron firing histograms.
            callbacks.SparsityCallback(os.path.join(tensorboard, "sparsity")),
            *(callback for evaluator in evaluators.values()
              if evaluator.callbacks for callback in evaluator.callbacks(run)),
        ]

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
        sparsity = callbacks.sparse_layers(model)
        nonzero = {path: float(m.result()) for path, m in sparsity.items()}
        dead = {path: float(m.dead_fraction()) for path, m in sparsity.items()}
        # Each evaluation leaves the layers' sparsity metrics as evaluate
        # left them (sparsity.metrics_restored).
        evaluated = {}
        for evaluator in evaluators.values():
            if evaluator.evaluate:
                for key, value in evaluator.evaluate(run).items():
                    if key == "eval":
                        metrics.update(value)
                    else:
                        evaluated[key] = value
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    # === Report ===
    report = {
        "model": config.model.name,
        "dataset": config.data.name,
        # Share of training labels replaced by a uniformly drawn class.
        "label_noise": float(config.data.get("label_noise", 0.0)),
        "k": config.model.get("k"),
        "strategy": type(strategy).__name__.lstrip("_"),
        "replicas": strategy.num_replicas_in_sync,
        "jit_compile": jit_compile,
        "num_params": model.count_params(),
        "epochs": config.epochs,
        # The epochs this run trained: fewer than `epochs` when it resumed.
        "epochs_run": list(history.epoch),
        "steps_per_epoch": steps_per_epoch,
        "train_steps": run.step(),
        "eval": {name: float(value) for name, value in metrics.items()
                 if "nonzero_fraction" not in name},
        # Measured on the evaluation split, the paper's per-token share.
        "nonzero_fraction": nonzero,
        "mean_nonzero_fraction": float(np.mean(list(nonzero.values())))
        if nonzero else None,
        # Neurons that never fired on the evaluation split.
        "dead_fraction": dead,
        # What the evaluators measured (robustness, two-stage scoring, ...).
        **evaluated,
        "history": {name: [float(v) for v in values]
                    for name, values in history.history.items()},
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.time() - start, 2),
    }
    _write_json(os.path.join(workdir, "report.json"), report)
    print(format_report(report, workdir), flush=True)
    model.save(os.path.join(workdir, "model.keras"))
    return report


def _evaluators(config, spec):
    """`{name: Evaluator}` of the model's evaluators that `config` asks
    for; raises if it asks for one the model does not list."""
    for name in spec.evaluators:
        registry.lookup(registry.EVALUATORS, name, "evaluator")
    chosen = {}
    for name, evaluator in registry.EVALUATORS.items():
        if not evaluator.requested(config):
            continue
        if name in spec.evaluators:
            chosen[name] = evaluator
        elif evaluator.key:
            raise ValueError(
                f"config.{evaluator.key} asks for the {name!r} evaluation, "
                f"which model {config.model.name!r} does not support (it "
                f"supports {list(spec.evaluators)}): unset it.")
    return chosen


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
    """A few lines for the log: final metrics and MLP activation sparsity,
    then what each evaluator that ran describes."""
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
    for evaluator in registry.EVALUATORS.values():
        if evaluator.describe:
            lines += ["  " + line for line in evaluator.describe(report)]
    lines.append(f"  report: {os.path.join(workdir, 'report.json')}")
    return "\n".join(lines)


def _write_json(path, obj):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
