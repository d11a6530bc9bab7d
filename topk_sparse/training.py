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
`model.keras` (at the end); with `config.model.k = "auto:<mean k>"`,
`allocation.json` (the k per MLP allocated before training) and, with
`config.dense_warmup_epochs`, `dense_warmup/` (the workdir of the dense run
it was allocated on).

`config` is an `ml_collections.ConfigDict` from a `configs/*.py` file; see
`configs/vit_digits.py` for every key.
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from topk_sparse import (allocation, callbacks, checkpoint, checks, data,
                         distribute, evaluation, optimizers, registry,
                         sparsity)

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
        checks.positive_int(config[key], f"config.{key}", error=ConfigError)
    if config.steps_per_epoch is not None:
        checks.positive_int(config.steps_per_epoch, "config.steps_per_epoch",
                            error=ConfigError)
    _check_workdir(workdir, config)
    tf.io.gfile.makedirs(workdir)
    _write_json(os.path.join(workdir, "config.json"), _json(config))
    keras.utils.set_random_seed(config.seed)

    # === Strategy ===
    if strategy is None:
        strategy = distribute.get_strategy(
            config.strategy, tpu=config.tpu,
            num_cpu_devices=config.get("num_cpu_devices"))
    distribute.per_replica_batch(config.batch_size, strategy)
    jit_compile = _jit_compile(config.jit_compile, strategy)

    # === Dense warm-up: k "auto:<mean k>" with no model to start from ===
    budget = auto_budget(config.model.get("k"))
    source = _source(config, budget, workdir, strategy)
    keras.utils.set_random_seed(config.seed)  # as if it had not run here

    # === Input pipeline ===
    with _config_errors("config.data"):
        train_data, num_train = data.load(
            config.data, "train", config.batch_size, train=True,
            seed=config.seed)
        eval_data, _ = data.load(
            config.data, "test", config.eval.batch_size, train=False,
            seed=config.seed)
    steps_per_epoch = config.steps_per_epoch or (
        num_train // config.batch_size if num_train else None)
    if not steps_per_epoch:
        raise ConfigError(
            f"config.steps_per_epoch must be set for {config.data.name!r}, "
            f"whose training stream has no fixed size.")
    total_steps = config.epochs * steps_per_epoch

    # === Model and optimizer ===
    initial = _initial_model(source)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    try:
        with strategy.scope():
            model_kwargs = dict(config.model)
            del model_kwargs["name"]

            def build(**changes):
                with _config_errors("config.model"):
                    model = spec.build({**model_kwargs, **changes},
                                       registry.DataSpec(
                                           train_data.element_spec,
                                           data.features(config.data)))
                if not model.built:  # checkpoint.restore needs variables
                    model(data.numpy_inputs(next(iter(train_data))[0]))
                return model

            model = build(**({} if budget is None else {"k": None}))
            if initial is not None:
                _copy_weights(initial, model, source)
            allocated = None
            if budget is not None:  # allocated on the dense model
                allocated = _allocated_k(config, source, model, workdir,
                                         budget)
                dense, model = model, build(k=allocated["k"])
                _copy_weights(dense, model, source)
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
                with _config_errors("config.eval"):
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
            layers = callbacks.sparse_layers(model).items()
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
    _write_json(os.path.join(workdir, "report.json"), report)
    if config.verbose:
        print(format_report(report, workdir), flush=True)
    model.save(os.path.join(workdir, "model.keras"))
    return report


ConfigError = checks.ConfigError

AUTO = "auto:"
"""`config.model.k = "auto:<mean k>"`: one k per MLP, allocated under that
mean k (`topk_sparse.allocation.allocate`) on the dense model of
`config.init_from`, or of a dense warm-up of `config.dense_warmup_epochs`,
then trained."""

WARMUP = "dense_warmup"
"""The folder of a run's dense warm-up in its workdir."""


def auto_budget(k):
    """The mean k of `config.model.k = "auto:<mean k>"`, None for any other
    k (an int, None, a list or mapping: the model checks those)."""
    if not isinstance(k, str):
        return None
    try:
        if not k.startswith(AUTO):
            raise ValueError
        return float(k[len(AUTO):])
    except ValueError:
        raise ConfigError(
            f"config.model.k={k!r} is not a k: give an int, None (dense), a "
            f"list or mapping of them, or {AUTO}<mean k> (e.g. {AUTO}16) to "
            f"allocate k per MLP on a dense model (config.init_from or "
            f"config.dense_warmup_epochs).") from None


def _source(config, budget, workdir, strategy):
    """The trained model this run starts from: `config.init_from`, or,
    with `config.dense_warmup_epochs`, the workdir of the dense warm-up,
    trained (or resumed, or found finished) here first. None: none."""
    epochs = config.get("dense_warmup_epochs") or 0
    if not epochs:
        if budget is not None and not config.get("init_from"):
            raise ConfigError(
                f"config.model.k={config.model.k!r} allocates k on a trained "
                f"dense model: set config.init_from to its workdir (a run "
                f"with config.model.k=None) or its .keras file, or "
                f"config.dense_warmup_epochs to train one first.")
        return config.get("init_from")
    checks.positive_int(epochs, "config.dense_warmup_epochs",
                        error=ConfigError)
    if budget is None:
        raise ConfigError(
            f"config.dense_warmup_epochs={epochs} trains a dense model to "
            f"allocate config.model.k='{AUTO}<mean k>' on, not for "
            f"k={config.model.get('k')!r}: unset it.")
    if config.get("init_from"):
        raise ConfigError(
            f"config.dense_warmup_epochs={epochs} and config.init_from="
            f"{config.init_from!r} both give the dense model to allocate k "
            f"on: unset one.")
    path = os.path.join(workdir, WARMUP)
    train(warmup_config(config), path, strategy)
    return path


def warmup_config(config):
    """The config of `config`'s dense warm-up: `config` at `k=None` for
    `config.dense_warmup_epochs` epochs, without the evaluations a config
    key asks for (it trains the weights that k is allocated on)."""
    warmup = copy.deepcopy(config)
    warmup.model.k = None
    warmup.epochs = config.dense_warmup_epochs
    warmup.dense_warmup_epochs = 0
    flat = _flatten(_json(warmup))
    warmup.update_from_flattened_dict({
        evaluator.key: type(flat[evaluator.key])()
        for evaluator in registry.EVALUATORS.values()
        if flat.get(evaluator.key)})
    return warmup


def _initial_model(source):
    """The model of `source` (a finished run's workdir, or a `.keras`
    file: `config.init_from`), loaded; None without one."""
    if not source:
        return None
    path = source if source.endswith(".keras") else os.path.join(
        source, "model.keras")
    if not tf.io.gfile.exists(path):
        raise ConfigError(
            f"config.init_from={source!r}: no {path}. Give a finished run's "
            f"workdir (it holds model.keras) or a .keras file.")
    return keras.saving.load_model(path, compile=False)


def _copy_weights(source, model, name):
    """Assigns `source`'s weights to `model`'s (counts left out), or raises
    a `ConfigError` where the architectures differ."""
    theirs = sparsity.weights_without_counts(source)
    mine = sparsity.weights_without_counts(model)
    shapes = [tuple(w.shape) for w in mine]
    if shapes != [tuple(w.shape) for w in theirs]:
        raise ConfigError(
            f"config.init_from={name!r} holds a model of another "
            f"architecture ({len(theirs)} weights, {source.count_params()} "
            f"parameters; this config's: {len(mine)}, "
            f"{model.count_params()}): give config.model its dimensions.")
    for weight, value in zip(mine, theirs):
        weight.assign(value)


def _allocated_k(config, source, model, workdir, budget):
    """`config.model.k = "auto:<budget>"`: the k per MLP allocated on
    `model` (dense, with the weights of `source`) from the first
    `config.eval.allocate.examples` training examples, kept in
    `<workdir>/allocation.json`: a resumed run reads it back. Where the
    run of `source` evaluated the same allocation (`_reported`), its k is
    taken instead of searching again."""
    path = os.path.join(workdir, "allocation.json")
    settings = config.eval.allocate
    how = {"examples": settings.examples, "step": settings.step,
           "by": settings.by}
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            allocated = json.load(f)
        before = {key: allocated.get(key) for key in how}
        if before != how:
            raise ConfigError(
                f"{path} holds k allocated with config.eval.allocate "
                f"{before}, not {how}: use another --workdir, or the same "
                f"settings to resume.")
        return allocated
    allocated = _reported(config, source, budget, how)
    if allocated is None:
        # From a split of its own: an iterator of the training stream would
        # reshuffle the stream fit then sees, which a resumed run, reading
        # allocation.json, would not.
        examples, _ = data.load(config.data, "train", config.batch_size,
                                train=True, seed=config.seed)
        with _config_errors("config.model.k"):
            chosen = allocation.allocate(
                model, data.first_inputs(examples, settings.examples),
                budget, settings.step, settings.by)
        allocated = {"mean_k": chosen.mean_k, "k": chosen.k,
                     "distance": chosen.distance, **how}
    _write_json(path, allocated)
    return allocated


def _reported(config, source, budget, how):
    """The k that the run of `source` allocated in its own
    allocation evaluation (its report.json), where it did so dense, at
    `budget`, with the settings `how`, on as many examples of the same
    training stream (the same seed, data, batch size and precision; drawn
    after its training, so in another shuffle of the split): what a search
    here would choose on such examples, without its minutes of eager
    passes. None otherwise."""
    try:
        with tf.io.gfile.GFile(os.path.join(source, "report.json")) as f:
            reported = json.load(f).get("allocation") or {}
        with tf.io.gfile.GFile(os.path.join(source, "config.json")) as f:
            trained = json.load(f)
    except (tf.errors.OpError, ValueError):  # a .keras file, or no report
        return None
    mine = _json(config)
    same = (trained["model"].get("k") is None
            and reported.get("mean_k") == budget
            and all(reported.get(key) == value for key, value in how.items())
            and all(trained.get(key) == mine[key] for key in (
                "seed", "data", "batch_size", "mixed_precision")))
    if not same:
        return None
    k = reported["k"]
    return {"mean_k": sum(k.values()) / len(k), "k": k,
            "distance": reported["distance"], **how,
            "reported_by": source}


# Config keys that change how a run is executed or evaluated, not what it
# trains: a workdir accepts a config that differs from its own only here.
RUNTIME_KEYS = ("eval", "verbose", "strategy", "tpu", "num_cpu_devices",
                "jit_compile", "steps_per_execution", "data.data_dir")


# Trained keys added since workdirs were first written, each with the
# value that trains as a config without it did: left out at that value, so
# that an older workdir still resumes and keeps its fingerprint.
ADDED_KEYS = {"dense_warmup_epochs": 0}


def _json(config):
    """`config` as the JSON values config.json holds."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def trained_config(config):
    """`{dotted key: value}` of what `config` trains: every key but the
    `RUNTIME_KEYS` and the `ADDED_KEYS` at their added values."""
    return {key: value for key, value in _flatten(
        config if isinstance(config, dict) else _json(config)).items()
        if not any(key == k or key.startswith(k + ".")
                   for k in RUNTIME_KEYS)
        and ADDED_KEYS.get(key, object()) != value}


def config_fingerprint(config):
    """A short hash of `trained_config(config)`: one default workdir per
    trained config."""
    text = json.dumps(trained_config(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _check_workdir(workdir, config):
    """Refuses a workdir whose run trained another config, naming the keys
    that differ, or that holds results without a config."""
    path = os.path.join(workdir, "config.json")
    if not tf.io.gfile.exists(path):
        for name in ("report.json", "backup"):
            if tf.io.gfile.exists(os.path.join(workdir, name)):
                raise ConfigError(
                    f"--workdir={workdir} holds {name} but no config.json: "
                    f"not a workdir this trainer can resume. Use another "
                    f"--workdir.")
        return
    with tf.io.gfile.GFile(path) as f:
        try:
            before = trained_config(json.load(f))
        except ValueError as e:
            raise ConfigError(f"{path} cannot be read ({e}): use another "
                              f"--workdir.") from e
    now = trained_config(config)
    missing = "(not set)"
    changed = [f"{key}: {before.get(key, missing)!r} -> "
               f"{now.get(key, missing)!r}"
               for key in sorted({*before, *now})
               if before.get(key, missing) != now.get(key, missing)]
    if changed:
        raise ConfigError(
            f"--workdir={workdir} holds a run of another config "
            f"({'; '.join(changed)}): use another --workdir (each config "
            f"has its own by default), or delete this one to start over.")


@contextlib.contextmanager
def _config_errors(section):
    """Reports a `ValueError` raised while reading `section` as a
    `ConfigError` naming it."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{section}: {e}") from e


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
            raise ConfigError(
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


def _write_json(path, obj):
    """Writes `obj` to `path` whole: under a temporary name, then renamed
    (a kill leaves the old file or the new one, never a part)."""
    temporary = path + ".tmp"
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    tf.io.gfile.rename(temporary, path, overwrite=True)
