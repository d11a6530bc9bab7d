"""A run's workdir: what it holds, and the one trained config it belongs to.

`topk_sparse.training.train(config, workdir)` writes there:

- `config.json`, first: the config, as `config_json` gives it;
- `tensorboard/`: the `fit` logs (loss and metrics); `tensorboard/sparsity/`
  has the MLPs' nonzero and dead fractions and histograms
  (`topk_sparse.callbacks.SparsityCallback`); evaluators add their own
  folders;
- `backup/`: the training state after every epoch (`topk_sparse.checkpoint`):
  a killed run started again with the same workdir resumes from its last
  finished epoch;
- `report.json` and `model.keras`, at the end;
- with `config.model.k = "auto:<mean k>"`, `allocation.json` (the k per MLP
  allocated before training) and, with `config.dense_warmup_epochs`,
  `dense_warmup/` (the workdir of the dense run it was allocated on):
  `topk_sparse.warm_start`.

A workdir belongs to the config it trained. `prepare` refuses, before
anything trains, a workdir whose config.json trained another config (naming
the keys that differ), one that holds results but no config.json, and a path
that is a file. The keys that change how a run is executed or evaluated, not
what it trains (`RUNTIME_KEYS`), may differ: the run resumes, or, finished,
evaluates again. `config_fingerprint` hashes the trained keys: the binaries'
default workdir is one per trained config.

The JSON files are written whole (`write_json`): under a temporary name, then
renamed into place, so that a kill leaves the old file or the new one, never
a part.
"""

import hashlib
import json
import os

import tensorflow as tf

from topk_sparse import checks

# Config keys that change how a run is executed or evaluated, not what it
# trains: a workdir accepts a config that differs from its own only here.
RUNTIME_KEYS = ("eval", "verbose", "strategy", "tpu", "num_cpu_devices",
                "jit_compile", "steps_per_execution", "data.data_dir")


# Trained keys added since workdirs were first written, each with the
# value that trains as a config without it did: left out at that value, so
# that an older workdir still resumes and keeps its fingerprint.
ADDED_KEYS = {"dense_warmup_epochs": 0,
              # Model arguments that became keys in 2026-12 (every argument
              # a user may set is a key), at the models' defaults.
              "model.recall_target": 0.95, "model.implementation": "auto",
              "model.patch_size": None, "model.num_buckets": 32,
              "model.max_distance": 128}


def config_json(config):
    """`config` (a ConfigDict) as the JSON values config.json holds."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def flat(config, prefix=""):
    """`{dotted key: value}` of `config`: a ConfigDict, or the dict that
    config.json holds."""
    tree = config if isinstance(config, dict) else config_json(config)
    items = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            items.update(flat(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def trained_config(config):
    """`{dotted key: value}` of what `config` trains: every key but the
    `RUNTIME_KEYS` and the `ADDED_KEYS` at their added values."""
    return {key: value for key, value in flat(config).items()
            if not any(key == k or key.startswith(k + ".")
                       for k in RUNTIME_KEYS)
            and ADDED_KEYS.get(key, object()) != value}


def config_fingerprint(config):
    """A short hash of `trained_config(config)`: one default workdir per
    trained config."""
    text = json.dumps(trained_config(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def prepare(workdir, config):
    """Makes `workdir` the workdir of `config` (writes its config.json), or
    raises a `checks.ConfigError` saying why it cannot be (`check`)."""
    check(workdir, config)
    tf.io.gfile.makedirs(workdir)
    write_json(os.path.join(workdir, "config.json"), config_json(config))


def check(workdir, config):
    """Refuses a workdir that is a file (or inside one), one that holds
    results without a config, and one whose run trained another config,
    naming the keys that differ."""
    _check_folder(workdir)
    path = os.path.join(workdir, "config.json")
    if not tf.io.gfile.exists(path):
        for name in ("report.json", "backup"):
            if tf.io.gfile.exists(os.path.join(workdir, name)):
                raise checks.ConfigError(
                    f"--workdir={workdir} holds {name} but no config.json: "
                    f"not a workdir this trainer can resume. Use another "
                    f"--workdir.")
        return
    with tf.io.gfile.GFile(path) as f:
        try:
            before = trained_config(json.load(f))
        except ValueError as e:
            raise checks.ConfigError(f"{path} cannot be read ({e}): use "
                                     f"another --workdir.") from e
    now = trained_config(config)
    missing = "(not set)"
    changed = [f"{key}: {before.get(key, missing)!r} -> "
               f"{now.get(key, missing)!r}"
               for key in sorted({*before, *now})
               if before.get(key, missing) != now.get(key, missing)]
    if changed:
        raise checks.ConfigError(
            f"--workdir={workdir} holds a run of another config "
            f"({'; '.join(changed)}): use another --workdir (each config "
            f"has its own by default), or delete this one to start over.")


def _check_folder(workdir):
    """Raises where `workdir`, or the nearest of the folders above it that
    exists, is a file: no folder can be made there (makedirs would fail
    with TensorFlow's FailedPreconditionError)."""
    existing = workdir
    while not tf.io.gfile.exists(existing):
        parent = os.path.dirname(existing)
        if parent in ("", existing):
            return
        existing = parent
    if not tf.io.gfile.isdir(existing):
        raise checks.ConfigError(
            f"--workdir={workdir}: {existing} is a file, not a folder. Use "
            f"another --workdir (a new folder, or a run's workdir to "
            f"resume).")


def write_json(path, obj):
    """Writes `obj` to `path` whole: under a temporary name, then renamed
    (a kill leaves the old file or the new one, never a part)."""
    temporary = path + ".tmp"
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    tf.io.gfile.rename(temporary, path, overwrite=True)
