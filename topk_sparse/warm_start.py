"""Starting a run from a trained model's weights, and choosing its k there.

A run starts from scratch, or from the weights of a trained model:

- `config.init_from`: a finished run's workdir (its model.keras) or a
  `.keras` file, whose weights are copied into the config's model (the same
  architecture; k may differ);
- `config.model.k = "auto:<mean k>"` (`AUTO`): one k per MLP, allocated
  under that mean k (`topk_sparse.allocation.allocate`, as
  `config.eval.allocate` says) on the dense model with those weights, then
  trained at that k from them. The k is kept in `<workdir>/allocation.json`
  for a resumed run; a dense run whose own allocation evaluation made the
  same search gives its k without searching again (`_reported`);
- `config.dense_warmup_epochs`, with "auto:<mean k>" and no init_from: the
  dense model is trained first, as a run of its own in
  `<workdir>/dense_warmup` (`WARMUP`, `warmup_config`).

`topk_sparse.training.train` calls `source` (and trains the warm-up it
returns), `load` and `build_model`, in that order.
"""

import copy
import json
import os

import keras
import tensorflow as tf

from topk_sparse import allocation, checks, data, registry
from topk_sparse import workdir as workdir_lib

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
        raise checks.ConfigError(
            f"config.model.k={k!r} is not a k: give an int, None (dense), a "
            f"list or mapping of them, or {AUTO}<mean k> (e.g. {AUTO}16) to "
            f"allocate k per MLP on a dense model (config.init_from or "
            f"config.dense_warmup_epochs).") from None


def source(config, workdir):
    """The trained model this run starts from, and the config to train it
    with first.

    Returns:
      `(config.init_from, None)`; with `config.dense_warmup_epochs`,
      `(<workdir>/dense_warmup, warmup_config(config))`: `train` that
      config there first (it resumes, or finds the warm-up finished);
      `(None, None)` for a run from scratch.

    Raises:
      checks.ConfigError: k, init_from and dense_warmup_epochs do not go
        together.
    """
    budget = auto_budget(config.model.get("k"))
    epochs = config.get("dense_warmup_epochs") or 0
    if not epochs:
        if budget is not None and not config.get("init_from"):
            raise checks.ConfigError(
                f"config.model.k={config.model.k!r} allocates k on a trained "
                f"dense model: set config.init_from to its workdir (a run "
                f"with config.model.k=None) or its .keras file, or "
                f"config.dense_warmup_epochs to train one first.")
        return config.get("init_from"), None
    checks.positive_int(epochs, "config.dense_warmup_epochs",
                        error=checks.ConfigError)
    if budget is None:
        raise checks.ConfigError(
            f"config.dense_warmup_epochs={epochs} trains a dense model to "
            f"allocate config.model.k='{AUTO}<mean k>' on, not for "
            f"k={config.model.get('k')!r}: unset it.")
    if config.get("init_from"):
        raise checks.ConfigError(
            f"config.dense_warmup_epochs={epochs} and config.init_from="
            f"{config.init_from!r} both give the dense model to allocate k "
            f"on: unset one.")
    return os.path.join(workdir, WARMUP), warmup_config(config)


def warmup_config(config):
    """The config of `config`'s dense warm-up: `config` at `k=None` for
    `config.dense_warmup_epochs` epochs, without the evaluations a config
    key asks for (it trains the weights that k is allocated on)."""
    warmup = copy.deepcopy(config)
    warmup.model.k = None
    warmup.epochs = config.dense_warmup_epochs
    warmup.dense_warmup_epochs = 0
    flat = workdir_lib.flat(warmup)
    warmup.update_from_flattened_dict({
        evaluator.key: type(flat[evaluator.key])()
        for evaluator in registry.EVALUATORS.values()
        if flat.get(evaluator.key)})
    return warmup


def load(source):
    """The model of `source` (a finished run's workdir, or a `.keras`
    file), loaded; None without one."""
    if not source:
        return None
    path = source if source.endswith(".keras") else os.path.join(
        source, "model.keras")
    if not tf.io.gfile.exists(path):
        raise checks.ConfigError(
            f"config.init_from={source!r}: no {path}. Give a finished run's "
            f"workdir (it holds model.keras) or a .keras file.")
    return keras.saving.load_model(path, compile=False)


def build_model(config, build, source, initial, workdir):
    """The model to train, made by `build(**changes)` (the config's model,
    its arguments changed) with the weights of `initial` (the model of
    `source`; None: as built).

    With `config.model.k = "auto:<mean k>"`, the dense model with those
    weights is built first and k allocated on it (`_allocated_k`).

    Returns:
      `(model, allocated)`: `allocated` is what allocation.json holds, None
      without "auto:<mean k>".
    """
    budget = auto_budget(config.model.get("k"))
    model = build(**({} if budget is None else {"k": None}))
    if initial is not None:
        _copy_weights(initial, model, source)
    if budget is None:
        return model, None
    allocated = _allocated_k(config, source, model, workdir, budget)
    dense, model = model, build(k=allocated["k"])
    _copy_weights(dense, model, source)
    return model, allocated


def _copy_weights(source, model, name):
    """Assigns `source`'s weights to `model`'s (the layers' sparsity counts
    are not weights), or raises a `ConfigError` where the architectures
    differ."""
    theirs, mine = source.weights, model.weights
    if [tuple(w.shape) for w in mine] != [tuple(w.shape) for w in theirs]:
        raise checks.ConfigError(
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
            raise checks.ConfigError(
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
        with checks.config_errors("config.model.k"):
            chosen = allocation.allocate(
                model, data.first_inputs(examples, settings.examples),
                budget, settings.step, settings.by)
        allocated = {"mean_k": chosen.mean_k, "k": chosen.k,
                     "distance": chosen.distance, **how}
    workdir_lib.write_json(path, allocated)
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
    mine = workdir_lib.config_json(config)
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
