"""What the trainer knows about models, datasets and evaluators: by name.

`training.train` looks up `config.model.name` and `config.data.name` here
and names no model or dataset itself. Each declares what the trainer needs
where it is defined:

- a model (`register_model`, in the model's own module: `"vit"` in
  topk_sparse/models/vit.py, `"t5"` in topk_sparse/models/t5.py): how it
  is built from `config.model` and the data, its loss, its `compile`
  metrics (`classifier_metrics`, `token_metrics` or its own) and the
  evaluators that apply to it;
- a dataset (`register_dataset`): its loader and what a model needs to know
  of it, such as `num_classes` or `vocab_size` (topk_sparse/data/);
- an evaluator (`register_evaluator`): when a config asks for it, what it
  checks before training, the callbacks it adds to `fit` and the report
  entries it measures after (topk_sparse/evaluation.py).

Adding a model means one `register_model(...)` call in its module,
imported before training (`topk_sparse.models` imports ViT's and T5's):

    registry.register_model(
        "my_model", build=lambda kwargs, data: MyModel(**kwargs, ...),
        metrics=lambda: {"metrics": [keras.metrics.SparseCategoricalAccuracy(
            name="accuracy")]},
        evaluators=("calibration",))
"""

import dataclasses
from typing import Callable, Optional

import keras

from topk_sparse import calibration, checks


@dataclasses.dataclass(frozen=True)
class Model:
    """A model family the trainer can build, compile and evaluate.

    Attributes:
      build: `(kwargs, data) -> keras.Model`: `kwargs` is `config.model`
        as a dict without `name`, `data` the `DataSpec` of the training
        stream. The model offers `sparse_mlps()`: its Top-k MLPs
        (`SparseMLP` or `TopKActivation` layers) by name, in layer order,
        which the trainer's report, callbacks, allocation and two-stage
        scoring read; its `k` argument takes one int, None, a list in that
        order or a mapping by those names.
      metrics: `() -> dict` of `compile` arguments (`metrics=[...]`,
        `weighted_metrics=[...]`), made fresh for each run.
      evaluators: names of the evaluators that apply to this model; a
        config that asks for another one is refused before training.
      loss: `() -> keras.losses.Loss`. Defaults to sparse categorical
        cross-entropy on logits (batches of `(inputs, labels[, weights])`).
    """
    build: Callable
    metrics: Callable
    evaluators: tuple = ()
    loss: Callable = lambda: keras.losses.SparseCategoricalCrossentropy(
        from_logits=True)


def classifier_metrics():
    """`compile` metrics of a classifier: accuracy, ECE and Brier score.
    The loss is the negative log-likelihood: no metric repeats it."""
    return {"metrics": [
        keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
        calibration.ExpectedCalibrationError(from_logits=True),
        calibration.BrierScore(from_logits=True)]}


def token_metrics():
    """`compile` metrics of a sequence model whose batches carry per-token
    weights (0 on padding), which only `weighted_metrics` apply."""
    return {"weighted_metrics": [keras.metrics.SparseCategoricalAccuracy(
        name="token_accuracy")]}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An input pipeline the trainer can load by name.

    Attributes:
      load: `(split, batch_size, *, train, seed, **kwargs) -> (dataset,
        num_examples or None)`; `kwargs` is `config.data` without `name`.
      features: `(kwargs) -> dict`: what a model must be told about the
        data (`{"num_classes": 10}`, `{"vocab_size": 359}`).
    """
    load: Callable
    features: Callable = lambda kwargs: {}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What `Model.build` sees of the data: the training stream's
    `element_spec` (batches of `(inputs, labels[, weights])`) and the
    dataset's `features`."""
    element_spec: tuple
    features: dict


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """An evaluation the trainer runs when the config asks for it.

    Attributes:
      requested: `(config) -> bool`: whether `config` asks for it.
      key: the config key that asks for it (`"eval.corruptions"`): a
        config that sets it for a model that does not list the evaluator
        is refused. Empty: it runs for the models that list it and is
        skipped silently for the others.
      check: `(run) -> None`: raises on bad arguments, before training.
      callbacks: `(run) -> list` of `fit` callbacks.
      evaluate: `(run) -> dict` of report entries, after training.
      describe: `(report) -> list of str`: lines for the printed report
        about what it added (none if it did not run).
    `run` is a `training.Run`: the config, model, data and workdir.
    """
    requested: Callable
    key: str = ""
    check: Optional[Callable] = None
    callbacks: Optional[Callable] = None
    evaluate: Optional[Callable] = None
    describe: Optional[Callable] = None


MODELS = {}
DATASETS = {}
EVALUATORS = {}


def _register(table, kind, name, entry):
    if not isinstance(name, str) or not name:
        raise ValueError(f"A {kind} name must be a non-empty str, got "
                         f"{name!r}.")
    table[name] = entry  # registering again replaces (module reloads)
    return entry


def register_model(name, build, metrics, evaluators=(), **kwargs):
    """Registers a model family as `config.model.name = name`."""
    return _register(MODELS, "model", name,
                     Model(build, metrics, tuple(evaluators), **kwargs))


def register_dataset(name, load, features=None):
    """Registers an input pipeline as `config.data.name = name`."""
    entry = Dataset(load) if features is None else Dataset(load, features)
    return _register(DATASETS, "dataset", name, entry)


def register_evaluator(name, requested, **kwargs):
    """Registers an evaluation; a model lists it in `evaluators`."""
    return _register(EVALUATORS, "evaluator", name,
                     Evaluator(requested, **kwargs))


def lookup(table, name, key):
    """`table[name]`, or a `ConfigError` naming the config `key` and the
    registered names."""
    if name not in table:
        raise checks.ConfigError(f"Unknown {key} {name!r}: choose one of "
                         f"{sorted(table)}.")
    return table[name]
