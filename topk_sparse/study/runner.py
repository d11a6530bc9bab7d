"""Running the study: trains the grid's runs, resumes, aggregates.

`run(study, workdir)` trains each run of `parts.grid` in
`<workdir>/runs/<run>` with `topk_sparse.training.train` (a run with a
report.json is skipped: a killed study resumes; several processes may share
a grid, each taking a run by its lock), then writes the summary
(`study.json`), the results page (`README.md`) and the figures.

The nonzero share at step 0 is measured here (`initial_nonzero`): the
run's model built with its seed, before any step, over `init_batches`
training batches and the whole evaluation split.
"""

import json
import os
import time

import keras

from topk_sparse import data, registry, training
from topk_sparse.study import page
from topk_sparse.study.parts import aggregate, grid
from topk_sparse.workdir import write_json


def run(study, workdir, log=print):
    """Trains the grid's missing runs in `<workdir>/runs/`, then writes
    study.json, README.md and the plots to `workdir`; returns the study
    dict.

    Several processes may run the same study at once (each takes a run by
    creating its `lock`, holding its pid): a process that ends while
    another still trains returns None and writes nothing; aggregate then
    with `study.train = False`, which trains nothing and aggregates the
    finished runs.
    """
    runs, roles = grid(study, workdir)
    start = time.time()
    results, elsewhere = [], []
    for i, spec in enumerate(runs):
        run_dir = os.path.join(workdir, "runs", spec["name"])
        report_path = os.path.join(run_dir, "report.json")
        init_path = os.path.join(run_dir, "init_nonzero.json")
        config = spec["config"]
        if not os.path.exists(report_path):
            if not study.train:
                continue
            source = spec["source"]
            if source and not os.path.exists(os.path.join(
                    workdir, "runs", source, "report.json")):
                # Earlier in the order: another process trains it, and
                # comes to this run after it.
                elsewhere.append(spec["name"])
                log(f"[{i + 1}/{len(runs)}] {spec['name']}: waits for "
                    f"{source}, running in another process")
                continue
            if not _take(run_dir):
                elsewhere.append(spec["name"])
                log(f"[{i + 1}/{len(runs)}] {spec['name']}: running in "
                    f"another process")
                continue
            run_start = time.time()
            _measure_initial(spec, init_path, study.init_batches)
            training.train(config, run_dir)
            keras.backend.clear_session()
            os.remove(os.path.join(run_dir, "lock"))
            log(f"[{i + 1}/{len(runs)}] {spec['name']}: "
                f"{time.time() - run_start:.0f} s, study "
                f"{time.time() - start:.0f} s")
        _measure_initial(spec, init_path, study.init_batches)
        results.append({"name": spec["name"], "cell": spec["cell"],
                        "seed": spec["seed"],
                        "config": json.loads(json.dumps(config.to_dict(),
                                                        default=str)),
                        "init_nonzero": None if spec["source"] else
                        _read_json(init_path),
                        "report": _read_json(report_path)})
    if elsewhere:
        log(f"{len(elsewhere)} runs were training in other processes: "
            f"aggregate when they finish (study.train = False).")
        return None
    cells = {r["cell"] for r in results}
    roles = _finished_roles(roles, cells)
    summary = {"claims": aggregate(results, roles, study.confidence),
               "parts": list(study.parts),
               "roles": roles, "confidence": study.confidence,
               "grid": {"runs": len(results), "cells": len(cells),
                        "planned_runs": len(runs),
                        "wall_time_s": round(sum(
                            r["report"]["wall_time_s"] for r in results), 1)},
               "runs": results}
    write_json(os.path.join(workdir, "study.json"), summary)
    with open(os.path.join(workdir, "README.md"), "w") as f:
        f.write(page.results_page(summary))
    page.plot(summary, workdir)
    return summary


def initial_nonzero(config, batches):
    """Step-0 nonzero fraction per MLP: `{"train": {layer: f}, "eval":
    {layer: f}}`, of the model `config` trains built with its seed, over
    `batches` training batches and the whole evaluation split."""
    keras.utils.set_random_seed(config.seed)
    spec = registry.lookup(registry.MODELS, config.model.name,
                           "config.model.name")
    train_data, _ = data.load(config.data, "train", config.batch_size,
                              train=True, seed=config.seed)
    eval_data, _ = data.load(config.data, "test", config.eval.batch_size,
                             train=False, seed=config.seed)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    try:
        kwargs = dict(config.model)
        del kwargs["name"]
        model = spec.build(kwargs, registry.DataSpec(
            train_data.element_spec, data.features(config.data)))
        model(data.numpy_inputs(next(iter(train_data))[0]),
              training=False)  # builds the metrics
        mlps = model.sparse_mlps()
        measured = {}
        for split, stream in (("train", train_data.take(batches)),
                              ("eval", eval_data)):
            for mlp in mlps.values():
                mlp.nonzero_fraction.reset_state()
            for batch in stream:
                model(data.numpy_inputs(batch[0]), training=False)
            measured[split] = {name: float(mlp.nonzero_fraction.result())
                               for name, mlp in mlps.items()}
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return measured


def _measure_initial(spec, path, batches):
    """Writes the run's `initial_nonzero` to `path` once (also for a run
    trained before this code); a fine-tuning run starts trained: none."""
    if spec["source"] is None and not os.path.exists(path):
        write_json(path, initial_nonzero(spec["config"], batches))
        keras.backend.clear_session()


def _take(run_dir):
    """Takes the run in `run_dir` for this process: False if a live process
    holds its lock. A killed process's lock is taken over."""
    os.makedirs(run_dir, exist_ok=True)
    lock = os.path.join(run_dir, "lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            with open(lock) as f:
                pid = int(f.read() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and _alive(pid):
            return False
        fd = os.open(lock, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finished_roles(roles, cells):
    """`roles` without the cells that have no finished run."""
    kept = {}
    for role, value in roles.items():
        if isinstance(value, dict):
            kept[role] = {k: c for k, c in value.items() if c in cells}
        elif value in cells:
            kept[role] = value
    return kept


def _read_json(path):
    with open(path) as f:
        return json.load(f)
