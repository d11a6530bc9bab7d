"""The train/evaluate routine the binaries call: `train(config, workdir)`.

Top to bottom, as in big_vision's trainers:

    workdir -> strategy -> warm start -> input pipeline -> model and
    optimizer (in strategy.scope()) -> backup (resume) -> callbacks (NaN
    guard, TensorBoard, sparsity, evaluators', backup) -> model.fit ->
    evaluate and evaluators -> report

It names no model and no dataset: `config.model.name`, `config.data.name`
and the evaluations the config asks for are looked up in
`topk_sparse.registry`, where each declares what this routine needs.

What the workdir holds, and how it refuses another config's run:
`topk_sparse.workdir`. A run that starts from a trained model's weights
(`config.init_from`, k "auto:<mean k>" allocated on it, a dense warm-up):
`topk_sparse.warm_start`.

`config` is an `ml_collections.ConfigDict` from a `configs/*.py` file; see
`configs/vit_digits.py` for every key.
"""

import dataclasses
import math
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from topk_sparse import (callbacks, checkpoint, checks, data, distribute,
                         evaluation, optimizers, registry, warm_start)
from topk_sparse import workdir as workdir_lib

del evaluation  # imported for its registrations


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
    for key in ("epochs", "batch_size"):
        checks.positive_int(config[key], f"config.{key}",
                            error=checks.ConfigError)
    if config.steps_per_epoch is not None:
        checks.positive_int(config.steps_per_epoch, "config.steps_per_epoch",
                            error=checks.ConfigError)
    workdir_lib.prepare(workdir, config)  # or refuses it
    keras.utils.set_random_seed(config.seed)

    # === Strategy ===
    if strategy is None:
        strategy = distribute.get_strategy(
            config.strategy, tpu=config.tpu,
            num_cpu_devices=config.get("num_cpu_devices"))
    distribute.per_replica_batch(config.batch_size, strategy)
    jit_compile = _jit_compile(config.jit_compile, strategy)

    # === Warm start: config.init_from, or a dense warm-up trained first ===
    source, warmup = warm_start.source(config, workdir)
    if warmup is not None:  # trains it, resumes it or finds it finished
        train(warmup, source, strategy)
    keras.utils.set_random_seed(config.seed)  # as if it had not run here

    # === Input pipeline ===
    with checks.config_errors("config.data"):
        train_data, num_train = data.load(
            config.data, "train", config.batch_size, train=True,
            seed=config.seed)
        eval_data, _ = data.load(
            config.data, "test", config.eval.batch_size, train=False,
            seed=config.seed)
    steps_per_epoch = config.steps_per_epoch or (
        num_train // config.batch_size if num_train else None)
    if not steps_per_epoch:
        raise checks.ConfigError(
            f"config.steps_per_epoch must be set for {config.data.name!r}, "
            f"whose training stream has no fixed size.")
    total_steps = config.epochs * steps_per_epoch

    # === Model and optimizer ===
    initial = warm_start.load(source)  # None: from scratch
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    try:
        with strategy.scope():
            model_kwargs = dict(config.model)
            del model_kwargs["name"]

            def build(**changes):
                with checks.config_errors("config.model"):
                    model = spec.build({**model_kwargs, **changes},
                                       registry.DataSpec(
                                           train_data.element_spec,
                                           data.features(config.data)))
                if not model.built:  # checkpoint.restore needs variables
                    model(data.numpy_inputs(next(iter(train_data))[0]))
                return model

            # With the weights of `source`; k "auto:<mean k>" allocated.
            model, allocated = warm_start.build_model(
                config, build, source, initial, workdir)
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
                with checks.config_errors("config.eval"):
                    evaluator.check(run)

        # === Backup ===
        backup_dir = os.path.join(workdir, "backup")
        progress = checkpoint.restore(model, backup_dir)
        checkpoint.check_backend(progress, backup_dir)
        if progress is None and tf.io.gfile.exists(
                os.path.join(workdir, "report.json")):
            raise RuntimeError(
                f"{workdir} holds the report of a finished run but no backup "
                f"in {backup_dir} to evaluate it from: use another "
                f"--workdir, or delete {workdir} to train again.")
        # The step count came back with the optimizer: the one source of
        # the epoch to resume from.
        initial_epoch = run.step() // steps_per_epoch
        if progress is not None:
            print(f"Resumed from epoch {initial_epoch} of {config.epochs} "
                  f"(step {run.step()}), backup in {backup_dir}.",
                  flush=True)
        backup = checkpoint.Backup(backup_dir, progress)

        # === Callbacks ===
        tensorboard = os.path.join(workdir, "tensorboard")
        fit_callbacks = [
            # First: raise before a backup could save the diverged weights.
            FailOnNonFiniteLoss(),
            # Loss and metrics; the MLPs' sparsity is SparsityCallback's.
            callbacks.TensorBoard(tensorboard),
            # Per MLP: nonzero and dead fractions, neuron firing histograms.
            callbacks.SparsityCallback(os.path.join(tensorboard, "sparsity")),
            *(callback for evaluator in evaluators.values()
              if evaluator.callbacks for callback in evaluator.callbacks(run)),
            # Last: the epoch's logs are complete. Kept after training, so
            # that starting a finished run again only evaluates.
            backup,
        ]

        # === Fit and evaluate: on JAX, in keras.distribution's scope ===
        with distribute.running(strategy):
            # The seeded stream from the step reached: the batches an
            # uninterrupted run would see (the skipped ones are read, not
            # trained on).
            history = model.fit(
                train_data.skip(run.step()), epochs=config.epochs,
                initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                validation_data=eval_data if config.eval.every_epochs
                else None, validation_freq=config.eval.every_epochs or 1,
                callbacks=fit_callbacks, verbose=config.verbose,
                shuffle=False)  # the input pipeline shuffles

            # === Evaluate ===
            metrics = model.evaluate(eval_data, return_dict=True, verbose=0)
            layers = callbacks.nonzero_fractions(model).items()
            nonzero = {path: float(m.result()) for path, m in layers}
            dead = {path: float(m.dead_fraction()) for path, m in layers}
            widths = {path: m.mlp_dim for path, m in layers}
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
        # The trained model whose weights this run started from
        # (config.init_from, or the dense warm-up's workdir), and for k
        # "auto:<mean k>" the k allocated on it (allocation.json).
        "init_from": source,
        "auto_k": allocated,
        # Each sparse layer's hidden width and k: k / mlp_dim is Top-k's
        # share (k None: dense).
        "mlp_dim": widths,
        "mlp_k": {name: mlp.k for name, mlp in model.sparse_mlps().items()},
        "backend": keras.config.backend(),
        "strategy": distribute.name_of(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "jit_compile": jit_compile,
        "num_params": model.count_params(),
        "epochs": config.epochs,
        # The epochs this process trained: fewer than `epochs` when it
        # resumed; the history covers the whole run.
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
        "history": backup.history,
        "train_time_s": round(backup.train_time_s, 2),
        "wall_time_s": round(time.time() - start, 2),
    }
    workdir_lib.write_json(os.path.join(workdir, "report.json"), report)
    if config.verbose:
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
            raise checks.ConfigError(
                f"config.{evaluator.key} asks for the {name!r} evaluation, "
                f"which model {config.model.name!r} does not support (it "
                f"supports {list(spec.evaluators)}): unset it.")
    return chosen


def _jit_compile(requested, strategy):
    """`requested`, except where one of its two modes does not exist.

    `jit_compile=False` is TensorFlow's graph mode without XLA. JAX has no
    such mode (its other one runs the step eagerly, op by op, many times
    slower): on JAX the steps are compiled whatever was requested. Under
    MirroredStrategy over CPU devices XLA fails on variables placed on
    another logical device (an XLA known issue, seen here with Keras 3.15 /
    TensorFlow 2.20): there the steps run without XLA.
    """
    if keras.config.backend() == "jax":
        return True
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
        f"x{report['replicas']} on {report['backend']}",
        f"  eval: {metrics}",
    ]
    if report.get("auto_k"):
        ks = ", ".join(f"{name} {k}"
                       for name, k in report["auto_k"]["k"].items())
        lines.append(f"  k allocated on {report['init_from']} before "
                     f"training (mean {report['auto_k']['mean_k']:g}): {ks}")
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

