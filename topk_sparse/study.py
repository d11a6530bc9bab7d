"""The Lazy Neuron study: a grid of training runs, statistics, tables, plots.

`run(study_config, workdir)` trains every run of the grid that
`configs/study.py` describes with `topk_sparse.training.train`, each in
`<workdir>/runs/<run>` (a run with a report.json is skipped: a killed study
resumes), then writes `<workdir>/study.json` (every run's config, report
and step-0 sparsity; per claim, each quantity's mean over seeds with a
t-interval and the verdict), `README.md` (the results page: one table per
claim, the figures; `results_page`) and the plots `claim{1,2,3,4}_*.png`,
`allocation.png`. The repository's `results/` is such a workdir, less its
runs (claims 1-4), and `results/allocation/` one of the allocation part.

The claims (*The Lazy Neuron Phenomenon*, arXiv 2210.06313):

1. MLP activations of trained Transformers are sparse at every layer, on
   train and eval data alike; about 50% nonzero at initialization.
2. Wider MLPs give a lower nonzero share; deeper models sparser middles.
3. Sparsity also emerges with random labels, random inputs and unlimited
   (never repeated) data.
4. Top-k below the natural level is less sensitive to label noise, more
   robust to noise corruptions and better calibrated (Table 1).

The allocation part (`study.parts`; choosing k, not in the paper): at the
same mean k, one k per MLP allocated on a dense model
(`topk_sparse.allocation.allocate`) against the same k everywhere, on the
test split without fine-tuning (the dense runs' allocation evaluation) and
after fine-tuning each from the dense run of its seed (`config.model.k`
"auto:<mean k>" against k = mean k, `config.init_from`).

Nonzero fraction at step 0 is measured here (`initial_nonzero`): the run's
model built with its seed, before any step, over `init_batches` training
batches and the whole evaluation split. After that, the curves are the
trainer's per-epoch history: `<layer>/nonzero_fraction` (the epoch's
training batches) and `val_<layer>/nonzero_fraction` (the evaluation
split).

Verdicts compare a quantity's 95% t-interval over seeds (paired by seed
where two cells are compared) with the paper's claim:
- a sign ("> 0", "< 0"): agrees when the interval excludes 0 on the
  paper's side, does not when it excludes 0 on the other, else not
  significant;
- a level ("≈ 50 ± 5"): agrees when the interval lies inside, does not when
  it lies wholly outside, else not significant;
- a count ("all"): agrees when every MLP's interval is on the paper's side.
"""

import copy
import json
import math
import os
import time

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from topk_sparse import data, registry, training
from topk_sparse.data import images
from topk_sparse.models import vit as vit_lib

RANDOM_IMAGES = "random_images"
"""Dataset name of claim 3's random inputs: uniform pixels, uniform labels."""


def load_random_images(split, batch_size, *, train, seed=0, image_size=16,
                       channels=1, num_classes=10, num_examples=1437):
    """A fixed set of uniform-noise images with uniform random labels.

    The "random images" of the paper's claim 3: nothing to learn but the
    labels of `num_examples` training images by heart. The test split has a
    quarter as many, drawn from another stream.

    Returns:
      `(dataset, num_examples)` as the image pipelines do
      (`topk_sparse.data.images.load`).
    """
    rng = np.random.default_rng([seed, int(split == "test")])
    n = num_examples if split == "train" else max(num_examples // 4, 1)
    x = rng.uniform(size=(n, image_size, image_size, channels))
    y = rng.integers(0, num_classes, n)
    ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"),
                                             y.astype("int32")))
    if train:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.prefetch(tf.data.AUTOTUNE), n


registry.register_dataset(
    RANDOM_IMAGES, load_random_images,
    features=lambda kwargs: {"num_classes": kwargs.get("num_classes", 10)})

# Table 1 of the paper (ViT-B/16 on ImageNet-1k): Top-128 minus dense, in
# points. Clean accuracy: "about the same" (74.83 vs 74.85).
PAPER_TABLE1 = {
    "clean": 74.83 - 74.85,
    "noise0.4": 62.13 - 59.44,
    "noise0.8": 30.80 - 25.35,
    "gaussian_noise": 42.29 - 39.54,
    "impulse_noise": 40.07 - 37.37,
    "shot_noise": 40.68 - 38.56,
    "ece": 7.48 - 8.42,
}
# Mean nonzero share after training (%), ViT-B/16 and T5-Base.
PAPER_NONZERO = {"vit": 6.3, "t5": 3.0}


# === Grid ===

def cell_name(config):
    """The cell a run config belongs to: its name without the seed."""
    model = config.model
    parts = [model.name, config.data.name,
             "dense" if model.k is None else
             model.k.replace(":", "") if isinstance(model.k, str) else
             f"top{model.k}"]
    if model.name == "vit":
        parts += [f"mlp{model.mlp_dim}", f"depth{model.depth}"]
    noise = config.data.get("label_noise", 0.0)
    if noise:
        parts.append(f"noise{noise:g}")
    if config.get("init_from"):
        parts.append("finetuned")
    return "-".join(parts)


def grid(study, workdir=""):
    """`(runs, roles)`: the runs in order (dicts of name, cell, seed,
    config, and `source`: the run a fine-tuning starts from, or None) and
    which cell answers which part of which claim. `study.parts` picks the
    cells; a fine-tuning run's `config.init_from` is its source's folder
    under `workdir`."""
    vit = copy.deepcopy(study.vit)
    vit.unlock()  # a locked --config: its copies gain keys below
    variant = vit_lib.VIT_VARIANTS[vit.model.variant]
    # Explicit, so that every cell's name and fingerprint say them.
    vit.model.mlp_dim = vit.model.get("mlp_dim") or variant["mlp_dim"]
    vit.model.depth = vit.model.get("depth") or variant["depth"]
    unknown = set(study.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"Unknown study parts {sorted(unknown)}: choose "
                         f"from {PARTS}.")
    runs, evals = {}, {}

    def add(base, seeds, model=None, data_config=None, eval_config=None,
            source=None, optimizer=None):
        config = copy.deepcopy(base)
        config.unlock()
        config.model.update(model or {})
        config.optimizer.update(optimizer or {})
        if data_config is not None:
            config.data = data_config
        if source is not None:
            config.init_from = "finetuned"  # named below, per seed
        cell = cell_name(config)
        # A cell's evaluations are those of every adder.
        evals.setdefault(cell, {}).update(eval_config or {})
        for seed in range(seeds):
            name = f"{cell}-seed{seed}"
            if name not in runs:
                run_config = copy.deepcopy(config)
                run_config.seed = seed
                parent = None if source is None else f"{source}-seed{seed}"
                if parent:
                    run_config.init_from = os.path.join(workdir, "runs",
                                                        parent)
                runs[name] = {"name": name, "cell": cell, "seed": seed,
                              "config": run_config, "source": parent}
        return cell

    roles = {}
    if "claims" in study.parts:
        roles.update({"claim4": {}, "width": {}, "depth": {}})
        # Claim 4 first: its clean cells carry the corruption evaluation.
        for k in (None, *study.k):
            for noise in study.label_noise:
                key = f"{'dense' if k is None else f'top{k}'}/noise{noise:g}"
                roles["claim4"][key] = add(
                    vit, study.claim4_seeds,
                    model={"k": k},
                    data_config=_with(vit.data, label_noise=noise),
                    eval_config={"corruptions": tuple(study.corruptions),
                                 "severities": tuple(study.severities)}
                    if noise == 0 else None)
        roles["claim1_vit"] = roles["claim4"]["dense/noise0"]
        for mlp_dim in study.widths:
            roles["width"][str(mlp_dim)] = add(vit, study.seeds,
                                               model={"mlp_dim": mlp_dim})
        for depth in study.depths:
            roles["depth"][str(depth)] = add(vit, study.seeds,
                                             model={"depth": depth})
        roles["random_labels"] = add(
            vit, study.seeds, data_config=_with(vit.data, label_noise=1.0))
        roles["random_inputs"] = add(vit, study.seeds,
                                     data_config=_random_images(
                                         vit.data, study.random_examples))
        roles["claim1_t5"] = roles["unlimited"] = add(study.t5, study.seeds)
    if "allocation" in study.parts:
        roles["allocation"] = {}
        for name, base in (("vit", vit), ("t5", study.t5)):
            setting = study.allocation[name]
            model = {"depth": setting.depth} if name == "vit" else {}
            allocate = _with(base.eval.allocate, mean_k=setting.mean_k)
            dense = roles["allocation"][f"{name}/dense"] = add(
                base, study.claim4_seeds, model=model,
                eval_config={"allocate": allocate})
            # Fine-tuned: allocated as the dense runs' evaluation did.
            for key, k in (("auto", f"auto:{setting.mean_k:g}"),
                           ("uniform", setting.mean_k)):
                roles["allocation"][f"{name}/{key}"] = add(
                    _with(base, epochs=setting.epochs), study.claim4_seeds,
                    model={**model, "k": k}, source=dense,
                    optimizer={"learning_rate": setting.learning_rate,
                               "warmup_steps": 0},
                    eval_config={"allocate": _with(allocate, mean_k=0)})
    for spec in runs.values():
        for key, value in evals[spec["cell"]].items():
            spec["config"].eval[key] = value
    # Every cell at 2 seeds first, then claim 4's other seeds, then the
    # others', then the fine-tunings (after the runs they start from): a
    # study stopped early has every trained cell, and claim 4 its seeds.
    claim4 = set(roles.get("claim4", {}).values())
    order = sorted(runs.values(), key=lambda r: (
        3 if r["source"] else 0 if r["seed"] < 2 else
        1 if r["cell"] in claim4 else 2, r["seed"]))
    return order, roles


PARTS = ("claims", "allocation")
"""`study.parts`: the paper's claims 1-4 (which share their cells), and
choosing k (`topk_sparse.allocation`, allocated against uniform k)."""


def _with(section, **changes):
    section = copy.deepcopy(section)
    section.update(changes)
    return section


def _random_images(data_config, num_examples):
    """`config.data` of random images shaped like `data_config`'s."""
    return ml_collections.ConfigDict({
        "name": RANDOM_IMAGES,
        "image_size": data_config.get("image_size") or 32,
        "channels": 1 if data_config.name == "digits" else 3,
        "num_classes": images.NUM_CLASSES.get(data_config.name, 10),
        "num_examples": num_examples})


# === Runs ===

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
    _write_json(os.path.join(workdir, "study.json"), summary)
    with open(os.path.join(workdir, "README.md"), "w") as f:
        f.write(results_page(summary))
    plot(summary, workdir)
    return summary


def _measure_initial(spec, path, batches):
    """Writes the run's `initial_nonzero` to `path` once (also for a run
    trained before this code); a fine-tuning run starts trained: none."""
    if spec["source"] is None and not os.path.exists(path):
        _write_json(path, initial_nonzero(spec["config"], batches))
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


def _write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


# === Statistics ===

def interval(values, confidence=0.95):
    """Mean of `values` with a two-sided t-interval: `{"mean", "low",
    "high", "n"}`; low and high are None for fewer than 2 values."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) \
        / math.sqrt(n)
    return {"mean": mean, "low": float(mean - half),
            "high": float(mean + half), "n": n}


def verdict(stat, test):
    """"agrees", "does not" or "not significant": `stat` (an `interval`)
    against `test`: `(">", 0)`, `("<", 0)` or `("≈", target, margin)`."""
    low, high = stat["low"], stat["high"]
    if low is None:
        return "not significant"
    if test[0] in (">", "<"):
        if low > test[1]:
            return "agrees" if test[0] == ">" else "does not"
        if high < test[1]:
            return "agrees" if test[0] == "<" else "does not"
        return "not significant"
    target, margin = test[1], test[2]
    if target - margin <= low and high <= target + margin:
        return "agrees"
    if high < target - margin or low > target + margin:
        return "does not"
    return "not significant"


def _test_text(test):
    if test[0] == "≈":
        return f"≈ {test[1]:g} ± {test[2]:g}"
    return f"{test[0]} {test[1]:g}"


def _row(quantity, paper, values, test, confidence, unit="pts"):
    stat = interval(values, confidence)
    return {"quantity": quantity, "paper": paper, "test": _test_text(test),
            "unit": unit, **stat, "values": [float(v) for v in values],
            "verdict": verdict(stat, test)}


def _layers(report):
    return list(report["nonzero_fraction"])


def _mean_layers(values):
    return float(np.mean(list(values.values())))


def _final_train(report):
    return {layer: report["history"][f"{layer}/nonzero_fraction"][-1]
            for layer in _layers(report)}


def curves(result):
    """`(steps, {"train": {layer: [...]}, "eval": {...}})` in percent,
    from step 0 (measured before training) to the end."""
    report = result["report"]
    spe = report["steps_per_epoch"]
    epochs = len(report["history"]["loss"])
    steps = [0] + [spe * (e + 1) for e in range(epochs)]
    out = {"train": {}, "eval": {}}
    for layer in _layers(report):
        for split, key in (("train", f"{layer}/nonzero_fraction"),
                           ("eval", f"val_{layer}/nonzero_fraction")):
            history = report["history"].get(key)
            if history and len(history) == epochs:
                out[split][layer] = [100 * result["init_nonzero"][split][
                    layer]] + [100 * v for v in history]
    return steps, out


def aggregate(results, roles, confidence=0.95):
    """Per claim (and the allocation part), its rows: quantity, paper,
    test, mean, interval, verdict; only the parts `roles` holds."""
    by_cell = {}
    for result in results:
        by_cell.setdefault(result["cell"], {})[result["seed"]] = result

    def per_seed(cell, fn):
        return [fn(r) for _, r in sorted(by_cell[cell].items())]

    def paired(cell_a, cell_b, fn):
        """fn(a) - fn(b) over the seeds both cells ran."""
        seeds = sorted(set(by_cell[cell_a]) & set(by_cell[cell_b]))
        return [fn(by_cell[cell_a][s]) - fn(by_cell[cell_b][s])
                for s in seeds]

    claims = {}
    if "claim4" in roles:
        claims.update(_claims(by_cell, roles, per_seed, paired, confidence))
    if roles.get("allocation"):
        claims["allocation"] = _allocation_rows(roles["allocation"],
                                                per_seed, paired, confidence)
    return claims


# The test metric of each model of the allocation part (higher: better).
METRICS = {"vit": "accuracy", "t5": "token_accuracy"}
_NAMES = {"vit": "ViT", "t5": "T5"}


def _allocation_rows(cells, per_seed, paired, confidence):
    """Allocated minus uniform k at the same mean k, paired by seed: test
    accuracy and loss without fine-tuning (the dense runs' evaluation) and
    after fine-tuning (the `auto` and `uniform` cells); and the allocated,
    fine-tuned model minus the dense one."""
    rows = []
    for model, metric in METRICS.items():
        dense = cells.get(f"{model}/dense")
        if dense is None:
            continue
        first = per_seed(dense, lambda r: r)[0]["report"]
        label = (f"{_NAMES[model]}, mean k {first['allocation']['mean_k']:g}"
                 f" of {next(iter(first['mlp_dim'].values()))}")

        def evaluated(key, name):
            return lambda r: _scaled(name, r["report"]["allocation"][key][
                name])
        for name in (metric, "loss"):
            rows.append(_allocation_row(
                f"{label}: allocated − uniform k, {_quantity(name)}, no "
                f"fine-tuning", name, [a - b for a, b in zip(
                    per_seed(dense, evaluated("allocated", name)),
                    per_seed(dense, evaluated("uniform", name)))],
                confidence))
        auto, uniform = (cells.get(f"{model}/{key}")
                         for key in ("auto", "uniform"))
        if auto is None or uniform is None:
            continue

        def test(name):
            return lambda r: _scaled(name, r["report"]["eval"][name])
        for name in (metric, "loss"):
            rows.append(_allocation_row(
                f"{label}: allocated − uniform k, {_quantity(name)}, "
                f"fine-tuned", name, paired(auto, uniform, test(name)),
                confidence))
        rows.append(_row(f"{label}: allocated and fine-tuned − dense, "
                         f"{_quantity(metric)}", "not in the paper",
                         paired(auto, dense, test(metric)), ("≈", 0, 1),
                         confidence))
    return rows


def _scaled(name, value):
    """A metric as the tables give it: accuracies in percent."""
    return value if name == "loss" else 100 * value


def _quantity(name):
    return "test loss" if name == "loss" else f"test {name.replace('_', ' ')}"


def _allocation_row(quantity, name, values, confidence):
    loss = name == "loss"
    return _row(quantity, "not in the paper", values,
                ("<" if loss else ">", 0), confidence,
                unit="nats" if loss else "pts")


def _claims(by_cell, roles, per_seed, paired, confidence):
    """The paper's claims 1-4: `{claim: rows}`."""
    claims = {"claim1": [], "claim2": [], "claim3": [], "claim4": []}

    def init_eval(r):
        return 100 * _mean_layers(r["init_nonzero"]["eval"])

    def final_eval(r):
        return 100 * r["report"]["mean_nonzero_fraction"]

    def fall(r):
        return init_eval(r) - final_eval(r)

    # Claim 1.
    for model in ("vit", "t5"):
        cell = roles[f"claim1_{model}"]
        name = _NAMES[model]
        rows = claims["claim1"]
        rows.append(_row(f"{name}: nonzero at initialization (%)", "≈ 50",
                         per_seed(cell, init_eval), ("≈", 50, 5), confidence,
                         unit="%"))
        paper = PAPER_NONZERO[model]
        rows.append(_row(
            f"{name}: nonzero after training (%)",
            f"{paper} ({'ViT-B/16' if model == 'vit' else 'T5-Base'})",
            per_seed(cell, final_eval), ("≈", paper, paper), confidence,
            unit="%"))
        rows.append(_row(f"{name}: fall during training, init − final",
                         "> 0", per_seed(cell, fall), (">", 0), confidence))
        layers = _layers(next(iter(by_cell[cell].values()))["report"])
        per_layer = [verdict(interval(per_seed(cell, lambda r, l=layer: 100 * (
            r["init_nonzero"]["eval"][l] - r["report"]["nonzero_fraction"][
                l])), confidence), (">", 0)) for layer in layers]
        fell = per_layer.count("agrees")
        rows.append({"quantity": f"{name}: MLPs whose nonzero fell "
                                 f"(interval > 0)",
                     "paper": "all", "test": "all", "unit": "MLPs",
                     "mean": fell, "low": None, "high": None,
                     "n": len(layers), "values": per_layer,
                     "text": f"{fell} of {len(layers)}",
                     "verdict": "agrees" if fell == len(layers) else
                     "does not" if "does not" in per_layer else
                     "not significant"})
        rows.append(_row(
            f"{name}: train − eval nonzero after training", "≈ 0",
            per_seed(cell, lambda r: 100 * (_mean_layers(_final_train(
                r["report"])) - r["report"]["mean_nonzero_fraction"])),
            ("≈", 0, 2), confidence))

    # Claim 2.
    rows = claims["claim2"]
    widths = sorted(roles["width"], key=int)
    narrow, wide = roles["width"][widths[0]], roles["width"][widths[-1]]
    rows.append(_row(f"nonzero, mlp_dim {widths[-1]} − {widths[0]}", "< 0",
                     paired(wide, narrow, final_eval), ("<", 0), confidence))

    def count(r):  # active neurons per token, mean over MLPs
        return r["report"]["mean_nonzero_fraction"] * r["config"]["model"][
            "mlp_dim"]
    rows.append(_row(f"active units per token, mlp_dim {widths[-1]} − "
                     f"{widths[0]}", "> 0", paired(wide, narrow, count),
                     (">", 0), confidence, unit="units"))
    depths = sorted(roles["depth"], key=int)
    shallow, deep = roles["depth"][depths[0]], roles["depth"][depths[-1]]
    rows.append(_row(f"nonzero, depth {depths[-1]} − {depths[0]} (mean "
                     f"over MLPs)", "< 0", paired(deep, shallow, final_eval),
                     ("<", 0), confidence))

    def edges_minus_middle(r):
        values = [r["report"]["nonzero_fraction"][l]
                  for l in _layers(r["report"])]
        if len(values) < 3:
            return float("nan")
        return 100 * (np.mean([values[0], values[-1]]) - np.mean(values[1:-1]))
    if int(depths[-1]) >= 3:
        rows.append(_row(f"depth {depths[-1]}: first & last − middle MLPs",
                         "> 0", per_seed(deep, edges_minus_middle), (">", 0),
                         confidence))

    # Claim 3.
    rows = claims["claim3"]
    for role, name in (("random_labels", "ViT, random labels"),
                       ("random_inputs", "ViT, random inputs"),
                       ("unlimited", "T5, unlimited stream")):
        rows.append(_row(f"{name}: fall during training, init − final",
                         "> 0 (numbers not published)",
                         per_seed(roles[role], fall), (">", 0), confidence))
    rows.append(_row("random − clean labels, nonzero after training",
                     "not published",
                     paired(roles["random_labels"], roles["claim1_vit"],
                            final_eval), ("<", 0), confidence))
    rows[-1]["verdict"] = "—"

    # Claim 4: Top-k minus dense, paired by seed.
    rows = claims["claim4"]

    def accuracy(r):
        return 100 * r["report"]["eval"]["accuracy"]

    def corrupted(name):
        return lambda r: 100 * r["report"]["robustness"]["corruptions"][
            name]["mean"]["accuracy"]

    def ece(r):
        return 100 * r["report"]["eval"]["expected_calibration_error"]

    topks = sorted({key.split("/")[0] for key in roles["claim4"]} - {"dense"},
                   key=lambda s: -int(s[3:]))
    noises = sorted({key.split("/")[1] for key in roles["claim4"]})
    measured = next(iter(by_cell[roles["claim4"]["dense/noise0"]].values()))[
        "report"]["robustness"]["corruptions"]
    corruptions = list(measured)
    # Each corruption holds its severities and their "mean".
    severities = {name: len(measured[name]) - 1 for name in corruptions}
    for topk in topks:
        cells = {noise: (roles["claim4"][f"{topk}/{noise}"],
                         roles["claim4"][f"dense/{noise}"])
                 for noise in noises}
        label = f"Top-{topk[3:]} − dense"
        rows.append(_row(f"{label}: clean accuracy", "−0.02 (≈ 0)",
                         paired(*cells["noise0"], accuracy), ("≈", 0, 1),
                         confidence))
        for noise in noises[1:]:
            paper = PAPER_TABLE1.get(noise)
            rows.append(_row(
                f"{label}: accuracy, {float(noise[5:]):.0%} label noise",
                f"{paper:+.2f}" if paper is not None else "not published",
                paired(*cells[noise], accuracy), (">", 0), confidence))
        for name in corruptions:
            paper = PAPER_TABLE1.get(name)
            rows.append(_row(
                f"{label}: accuracy, {name.replace('_', ' ')} "
                f"({severities[name]} severities)",
                f"{paper:+.2f}" if paper is not None else "not published",
                paired(*cells["noise0"], corrupted(name)), (">", 0),
                confidence))
        rows.append(_row(f"{label}: ECE, clean (15 bins)",
                         f"{PAPER_TABLE1['ece']:+.2f}",
                         paired(*cells["noise0"], ece), ("<", 0), confidence))
    return claims


# === Tables ===

_TITLES = {
    "claim1": "Claim 1: sparse at every layer, train and eval alike; ~50% "
              "at initialization",
    "claim2": "Claim 2: wider MLPs and deeper models are sparser",
    "claim3": "Claim 3: sparsity emerges with random labels, random inputs, "
              "unlimited data",
    "claim4": "Claim 4: Top-k below the natural level vs dense ReLU "
              "(paired by seed)",
    "allocation": "Choosing k: one k per MLP allocated vs uniform k at the "
                  "same mean k (paired by seed)",
}


def _fmt(value, digits=2):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


# The figures `plot` draws, with what each shows; the claims figures for
# the part "claims", allocation.png for "allocation".
FIGURES = {
    "claim1_sparsity_over_training.png": "nonzero share per MLP over "
                                         "training, train and eval data",
    "claim2_width_depth.png": "nonzero share and active units vs mlp_dim "
                              "and depth",
    "claim3_random.png": "nonzero share over training with random labels, "
                         "random inputs, an unlimited stream",
    "claim4_topk.png": "Top-k vs dense: accuracy under label noise and "
                       "corruptions, calibration",
    "allocation.png": "allocated vs uniform k at the same mean k, without "
                      "and with fine-tuning; the k chosen per MLP",
}


def figures_of(summary):
    """The names of `FIGURES` that `plot` draws for `summary`."""
    return [name for name in FIGURES
            if ("allocation" if name == "allocation.png" else "claim4")
            in summary["claims"]]


def results_page(summary):
    """Markdown: the study's results page (`<workdir>/README.md`): what ran,
    the figures, one table per claim. `results/README.md` is this page of
    `results/study.json` (tests/test_study.py checks that it is)."""
    grid = summary["grid"]
    # A study written before the allocation part existed ran the claims.
    parts = summary.get("parts", ["claims"])
    argument = "" if set(parts) == set(PARTS) else f":parts={','.join(parts)}"
    lines = [
        "# The Lazy Neuron study: results", "",
        f"Written by `python -m trainers.study --config=configs/study.py"
        f"{argument} "
        "--workdir=DIR` (`topk_sparse.study.results_page` of this folder's "
        f"`study.json`): {grid['runs']} of {grid['planned_runs']} runs in "
        f"{grid['cells']} cells, {grid['wall_time_s'] / 60:.0f} min of "
        "training and evaluation added over runs. Every run's config and "
        "report, and each quantity's values per seed: `study.json`. The "
        "grid and the verdict rules: `configs/study.py`, "
        "`topk_sparse/study.py`.", "",
        "## Figures", ""]
    for name in figures_of(summary):
        shows = FIGURES[name]
        lines += [f"{shows[0].upper()}{shows[1:]} (`{name}`):", "",
                  f"![{shows}]({name})", ""]
    lines += ["## Tables", "", tables(summary)]
    return "\n".join(lines)


def tables(summary):
    """Markdown: one table per claim (quantity, paper, ours, interval,
    seeds, verdict)."""
    pct = round(100 * summary["confidence"])
    lines = [f"Ours: mean over seeds; interval: {pct}% t-interval "
             f"(paired by seed for differences). Points (pts) are "
             f"percentage points. Verdict rules: topk_sparse/study.py.", ""]
    for claim, rows in summary["claims"].items():
        lines += [f"### {_TITLES[claim]}", "",
                  f"| quantity | paper | test | ours | {pct}% interval | "
                  f"seeds | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows:
            digits = 3 if row["unit"] == "nats" else 2  # losses: small
            ours = row.get("text") or \
                f"{_fmt(row['mean'], digits)} {row['unit']}"
            span = ("—" if row["low"] is None else
                    f"[{_fmt(row['low'], digits)}, "
                    f"{_fmt(row['high'], digits)}]")
            lines.append(f"| {row['quantity']} | {row['paper']} | "
                         f"{row['test']} | {ours} | {span} | "
                         f"{'—' if 'text' in row else len(row['values'])} "
                         f"| {row['verdict']} |")
        lines.append("")
    return "\n".join(lines)


# === Plots ===

def _band(ax, x, runs, label, style="-", color=None, confidence=0.95):
    """Mean over seeds of equal-length series, with the t-interval band."""
    runs = np.asarray(runs, np.float64)
    stats = [interval(runs[:, i], confidence) for i in range(runs.shape[1])]
    mean = [s["mean"] for s in stats]
    line, = ax.plot(x, mean, style, color=color, label=label)
    if stats[0]["low"] is not None:
        ax.fill_between(x, [s["low"] for s in stats],
                        [s["high"] for s in stats], color=line.get_color(),
                        alpha=0.15, linewidth=0)
    return line


def plot(summary, workdir=None, dpi=110):
    """The study's figures, `{file name: matplotlib Figure}`
    (`figures_of(summary)`: `claim1_sparsity_over_training.png` ...
    `claim4_topk.png`, `allocation.png`); with `workdir`, each is also
    written there as that PNG at `dpi`.

    Drawn on `Figure`s that pyplot never sees, so that no backend is
    switched: in a notebook, `display(figure)` shows one inline.
    """
    from matplotlib.figure import Figure

    conf = summary["confidence"]
    by_cell = {}
    for result in summary["runs"]:
        by_cell.setdefault(result["cell"], []).append(result)
    roles = summary["roles"]
    figures = {}

    def figure(name, rows, columns, figsize):
        figures[name] = Figure(figsize=figsize, dpi=dpi)
        return figures[name], figures[name].subplots(rows, columns)

    if "claim4" in summary["claims"]:
        _plot_claims(figure, by_cell, roles, conf)
    if "allocation" in summary["claims"]:
        _plot_allocation(figure, by_cell, roles["allocation"], conf)
    for name, fig in figures.items():
        fig.tight_layout()
        if workdir is not None:
            fig.savefig(os.path.join(workdir, name))
    return figures



def _plot_claims(figure, by_cell, roles, conf):
    """Draws the claims' figures with `figure(name, rows, columns,
    figsize)`; `by_cell`: `{cell: [run result]}`."""
    import matplotlib

    def cell_curves(cell, split):
        steps, per_layer, layers = None, {}, None
        for result in by_cell[cell]:
            steps, values = curves(result)
            layers = list(values[split])
            for layer in layers:
                per_layer.setdefault(layer, []).append(values[split][layer])
        return steps, per_layer, layers

    # Claim 1: per MLP, train (solid) and eval (dashed) from step 0.
    fig, axes = figure("claim1_sparsity_over_training.png", 1, 2, (12, 4.5))
    for ax, model, title in ((axes[0], "vit", "ViT"), (axes[1], "t5", "T5")):
        cell = roles[f"claim1_{model}"]
        colors = matplotlib.colormaps["viridis"](np.linspace(
            0, 0.9, len(_layers(by_cell[cell][0]["report"]))))
        for split, style in (("train", "-"), ("eval", "--")):
            steps, per_layer, layers = cell_curves(cell, split)
            for color, layer in zip(colors, layers):
                _band(ax, steps, per_layer[layer], f"{layer} ({split})",
                      style, color, conf)
        ax.axhline(50, color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel="training step (0: before training)",
               ylabel="nonzero MLP activations (%)",
               title=f"{title} ({cell}, {len(by_cell[cell])} seeds)")
        ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.suptitle("Claim 1: nonzero share per MLP over training, train "
                 "(solid) and eval (dashed) data")

    # Claim 2: width and depth.
    fig, axes = figure("claim2_width_depth.png", 1, 2, (12, 4.5))
    widths = sorted(roles["width"], key=int)
    stats = [interval([100 * r["report"]["mean_nonzero_fraction"]
                       for r in by_cell[roles["width"][w]]], conf)
             for w in widths]
    _errorbar(axes[0], [int(w) for w in widths], stats, "nonzero share (%)")
    counts = [interval([r["report"]["mean_nonzero_fraction"] * int(w)
                        for r in by_cell[roles["width"][w]]], conf)
              for w in widths]
    twin = axes[0].twinx()
    _errorbar(twin, [int(w) for w in widths], counts,
              "active units per token", color="tab:orange", marker="s")
    axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="mlp_dim", ylabel="nonzero MLP activations (%), eval",
                title="Width: nonzero share and count after training")
    twin.set_ylabel("active units per token")
    handles = axes[0].get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    axes[0].legend(handles[0] + more[0], handles[1] + more[1], fontsize=8)
    for depth in sorted(roles["depth"], key=int):
        runs = by_cell[roles["depth"][depth]]
        layers = _layers(runs[0]["report"])
        stats = [interval([100 * r["report"]["nonzero_fraction"][l]
                           for r in runs], conf) for l in layers]
        _errorbar(axes[1], list(range(1, len(layers) + 1)), stats,
                  f"depth {depth}")
    axes[1].xaxis.set_major_locator(_integer_ticks())
    axes[1].set(xlabel="block (1 = first)",
                ylabel="nonzero MLP activations (%), eval",
                title="Depth: nonzero share per block after training")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Claim 2: ViT, mean over seeds, {round(100 * conf)}% "
                 f"t-intervals")

    # Claim 3: mean over MLPs, eval data, from step 0.
    fig, ax = figure("claim3_random.png", 1, 1, (7.5, 4.5))
    for role, label in (("claim1_vit", "ViT, clean labels"),
                        ("random_labels", "ViT, random labels"),
                        ("random_inputs", "ViT, random inputs"),
                        ("unlimited", "T5, unlimited stream")):
        steps, per_layer, layers = cell_curves(roles[role], "eval")
        mean = np.mean([per_layer[l] for l in layers], axis=0)
        _band(ax, steps, mean, label, confidence=conf)
    ax.axhline(50, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="training step (0: before training)",
           ylabel="nonzero MLP activations (%), eval, mean over MLPs",
           title="Claim 3: sparsity without real labels, inputs or "
                 "repetition")
    ax.legend(fontsize=8)

    # Claim 4: accuracy under label noise, corruptions, ECE.
    fig, axes = figure("claim4_topk.png", 1, 3, (15, 4.5))
    models = sorted({key.split("/")[0] for key in roles["claim4"]},
                    key=lambda s: (s != "dense", -int(s[3:] or 0)
                                   if s != "dense" else 0))
    noises = sorted({key.split("/")[1] for key in roles["claim4"]})
    corruptions = list(by_cell[roles["claim4"]["dense/noise0"]][0][
        "report"]["robustness"]["corruptions"])
    for i, model in enumerate(models):
        label = "dense ReLU" if model == "dense" else f"Top-{model[3:]}"
        stats = [interval([100 * r["report"]["eval"]["accuracy"]
                           for r in by_cell[roles["claim4"][
                               f"{model}/{n}"]]], conf) for n in noises]
        _errorbar(axes[0], [100 * float(n[5:]) + 1.5 * i for n in noises],
                  stats, label)
        clean = by_cell[roles["claim4"][f"{model}/noise0"]]
        stats = [interval([100 * r["report"]["robustness"]["corruptions"][
            c]["mean"]["accuracy"] for r in clean], conf)
            for c in corruptions]
        _errorbar(axes[1], [j + 0.15 * i for j in range(len(corruptions))],
                  stats, label, linestyle="none")
        stat = interval([100 * r["report"]["eval"][
            "expected_calibration_error"] for r in clean], conf)
        _errorbar(axes[2], [i], [stat], label, linestyle="none")
    axes[0].set(xlabel="training labels replaced at random (%)",
                ylabel="clean test accuracy (%)",
                title="Label noise (trained noisy, tested clean)")
    axes[1].set_xticks(range(len(corruptions)),
                       [c.replace("_", " ") for c in corruptions])
    axes[1].set(xlabel="corruption", ylabel="accuracy (%), mean of "
                "severities", title="Input corruptions (trained clean)")
    axes[2].set_xticks(range(len(models)), [
        "dense" if m == "dense" else f"Top-{m[3:]}" for m in models])
    axes[2].set(xlabel="model", ylabel="ECE (%), 15 bins, clean test",
                title="Calibration")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"Claim 4: Top-k vs dense ViT, mean over seeds, "
                 f"{round(100 * conf)}% t-intervals")



def _plot_allocation(figure, by_cell, cells, conf):
    """allocation.png: per model, the test metric of uniform and allocated
    k without and with fine-tuning (the dense model's level dashed); the k
    allocated per MLP over the mean k."""
    fig, axes = figure("allocation.png", 1, 3, (15, 4.5))
    stages = ("no fine-tuning", "fine-tuned")
    for ax, (model, metric) in zip(axes, METRICS.items()):
        dense = cells.get(f"{model}/dense")
        if dense is None:
            continue
        runs = by_cell[dense]
        for i, key in enumerate(("uniform", "allocated")):
            stats = [interval([100 * r["report"]["allocation"][key][metric]
                               for r in runs], conf)]
            tuned = cells.get(f"{model}/{'auto' if i else 'uniform'}")
            if tuned is not None:
                stats.append(interval([100 * r["report"]["eval"][metric]
                                       for r in by_cell[tuned]], conf))
            _errorbar(ax, [j + 0.06 * (2 * i - 1) for j in range(len(stats))],
                      stats, f"{key} k")
        ax.axhline(100 * np.mean([r["report"]["eval"][metric] for r in runs]),
                   color="gray", linestyle="--", linewidth=1,
                   label="dense ReLU")
        ax.set_xticks(range(len(stages)), stages)
        ax.set_xlim(-0.5, len(stages) - 0.5)
        allocation = runs[0]["report"]["allocation"]
        ax.set(xlabel="after sparsifying the dense model",
               ylabel=f"{_quantity(metric)} (%)",
               title=f"{_NAMES[model]}: mean k {allocation['mean_k']:g} of "
                     f"{next(iter(runs[0]['report']['mlp_dim'].values()))}"
                     f", {len(runs)} seeds")
        ax.legend(fontsize=8)
        # The k allocated per MLP over the budget, mean over seeds.
        shares = np.array([[k / r["report"]["allocation"]["mean_k"]
                            for k in r["report"]["allocation"]["k"].values()]
                           for r in runs])
        _errorbar(axes[2], list(range(1, shares.shape[1] + 1)),
                  [interval(column, conf) for column in shares.T],
                  _NAMES[model])
    axes[2].axhline(1, color="gray", linestyle="--", linewidth=1,
                    label="uniform k")
    axes[2].xaxis.set_major_locator(_integer_ticks())
    axes[2].set(xlabel="MLP in layer order (T5: encoder, then decoder)",
                ylabel="allocated k / mean k",
                title="k chosen per MLP (no fine-tuning)")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Choosing k: allocated vs uniform k at the same mean k, "
                 f"mean over seeds, {round(100 * conf)}% t-intervals")


def _integer_ticks():
    import matplotlib.ticker
    return matplotlib.ticker.MaxNLocator(integer=True)


def _errorbar(ax, x, stats, label, color=None, marker="o", linestyle="-"):
    mean = np.array([s["mean"] for s in stats])
    low = np.array([s["mean"] if s["low"] is None else s["low"]
                    for s in stats])
    high = np.array([s["mean"] if s["high"] is None else s["high"]
                     for s in stats])
    ax.errorbar(x, mean, yerr=[mean - low, high - mean], label=label,
                color=color, marker=marker, linestyle=linestyle, capsize=3)
