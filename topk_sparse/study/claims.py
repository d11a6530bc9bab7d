"""The study's part "claims": the paper's claims 1-4, which share cells.

The claims (*The Lazy Neuron Phenomenon*, arXiv 2210.06313):

1. MLP activations of trained Transformers are sparse at every layer, on
   train and eval data alike; about 50% nonzero at initialization.
2. Wider MLPs give a lower nonzero share; deeper models sparser middles.
3. Sparsity also emerges with random labels, random inputs and unlimited
   (never repeated) data.
4. Top-k below the natural level is less sensitive to label noise, more
   robust to noise corruptions and better calibrated (Table 1).

A part of the study (`topk_sparse.study.parts`): its cells (`cells`), one
list of quantities per claim (`_claim1` ... `_claim4`: what each measures,
the paper's number, the test), the tables' headings and the figures.

The nonzero share at step 0 is the runner's measurement
(`topk_sparse.study.runner.initial_nonzero`); after that, the curves are
the trainer's per-epoch history (`curves`).
"""

import ml_collections
import numpy as np

from topk_sparse.data import images
from topk_sparse.data.random_images import RANDOM_IMAGES
from topk_sparse.study.cells import NAMES, changed
from topk_sparse.study.stats import (EveryMLP, Quantity, band, errorbar,
                                     integer_ticks, interval)

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
# Mean nonzero share after training (%) of the paper's models.
PAPER_NONZERO = {"vit": ("ViT-B/16", 6.3), "t5": ("T5-Base", 3.0)}

TITLES = {
    "claim1": "Claim 1: sparse at every layer, train and eval alike; ~50% "
              "at initialization",
    "claim2": "Claim 2: wider MLPs and deeper models are sparser",
    "claim3": "Claim 3: sparsity emerges with random labels, random inputs, "
              "unlimited data",
    "claim4": "Claim 4: Top-k below the natural level vs dense ReLU "
              "(paired by seed)",
}

FIGURES = {
    "claim1_sparsity_over_training.png": "nonzero share per MLP over "
                                         "training, train and eval data",
    "claim2_width_depth.png": "nonzero share and active units vs mlp_dim "
                              "and depth",
    "claim3_random.png": "nonzero share over training with random labels, "
                         "random inputs, an unlimited stream",
    "claim4_topk.png": "Top-k vs dense: accuracy under label noise and "
                       "corruptions, calibration",
}


# === Cells ===

def cells(study, bases, grid):
    """Adds the claims' cells to `grid`; returns their roles: "claim4"
    (`{"<dense|top<k>>/noise<label noise>": cell}`), "width" and "depth"
    (`{value: cell}`), "claim1_vit" (claim 4's dense clean cell),
    "random_labels", "random_inputs", "claim1_t5" and "unlimited" (T5's
    base cell)."""
    vit = bases["vit"]
    roles = {"claim4": {}, "width": {}, "depth": {}}
    # Claim 4 first: its clean cells carry the corruption evaluation.
    for k in (None, *study.k):
        for noise in study.label_noise:
            key = f"{'dense' if k is None else f'top{k}'}/noise{noise:g}"
            roles["claim4"][key] = grid.add(
                vit, study.claim4_seeds,
                model={"k": k},
                data_config=changed(vit.data, label_noise=noise),
                eval_config={"corruptions": tuple(study.corruptions),
                             "severities": tuple(study.severities)}
                if noise == 0 else None,
                early=True)  # a study stopped early has claim 4's seeds
    roles["claim1_vit"] = roles["claim4"]["dense/noise0"]
    for mlp_dim in study.widths:
        roles["width"][str(mlp_dim)] = grid.add(vit, study.seeds,
                                                model={"mlp_dim": mlp_dim})
    for depth in study.depths:
        roles["depth"][str(depth)] = grid.add(vit, study.seeds,
                                              model={"depth": depth})
    roles["random_labels"] = grid.add(
        vit, study.seeds, data_config=changed(vit.data, label_noise=1.0))
    roles["random_inputs"] = grid.add(vit, study.seeds,
                                      data_config=_random_images(
                                          vit.data, study.random_examples))
    roles["claim1_t5"] = roles["unlimited"] = grid.add(bases["t5"],
                                                       study.seeds)
    return roles


def _random_images(data_config, num_examples):
    """`config.data` of random images shaped like `data_config`'s."""
    return ml_collections.ConfigDict({
        "name": RANDOM_IMAGES,
        "image_size": data_config.get("image_size") or 32,
        "channels": 1 if data_config.name == "digits" else 3,
        "num_classes": images.NUM_CLASSES.get(data_config.name, 10),
        "num_examples": num_examples})


# === Statistics ===

def rows(roles, runs, confidence):
    """`{"claim1": rows, ..., "claim4": rows}` of the finished `runs`;
    `{}` when `roles` holds no claims."""
    if "claim4" not in roles:
        return {}
    return {claim: [quantity.row(confidence)
                    for quantity in quantities(roles, runs)]
            for claim, quantities in (("claim1", _claim1),
                                      ("claim2", _claim2),
                                      ("claim3", _claim3),
                                      ("claim4", _claim4))}


def _claim1(roles, runs):
    """Per model: nonzero at step 0 and after training, their fall overall
    and per MLP, and train against eval data after training."""
    quantities = []
    for model, (paper_model, paper) in PAPER_NONZERO.items():
        cell, name = roles[f"claim1_{model}"], NAMES[model]
        layers = _layers(runs.of(cell)[0]["report"])
        quantities += [
            Quantity(f"{name}: nonzero at initialization (%)", "≈ 50",
                     runs.per_seed(cell, _init_eval), ("≈", 50, 5),
                     unit="%"),
            Quantity(f"{name}: nonzero after training (%)",
                     f"{paper} ({paper_model})",
                     runs.per_seed(cell, _final_eval), ("≈", paper, paper),
                     unit="%"),
            Quantity(f"{name}: fall during training, init − final", "> 0",
                     runs.per_seed(cell, _fall), (">", 0)),
            EveryMLP(f"{name}: MLPs whose nonzero fell (interval > 0)",
                     [runs.per_seed(cell, _fall_of(layer))
                      for layer in layers], (">", 0)),
            Quantity(f"{name}: train − eval nonzero after training", "≈ 0",
                     runs.per_seed(cell, _train_minus_eval), ("≈", 0, 2)),
        ]
    return quantities


def _claim2(roles, runs):
    """ViT: the widest minus the narrowest MLP, the deepest minus the
    shallowest model, and the deepest's edges against its middle."""
    widths = sorted(roles["width"], key=int)
    narrow, wide = roles["width"][widths[0]], roles["width"][widths[-1]]
    depths = sorted(roles["depth"], key=int)
    shallow, deep = roles["depth"][depths[0]], roles["depth"][depths[-1]]
    quantities = [
        Quantity(f"nonzero, mlp_dim {widths[-1]} − {widths[0]}", "< 0",
                 runs.paired(wide, narrow, _final_eval), ("<", 0)),
        Quantity(f"active units per token, mlp_dim {widths[-1]} − "
                 f"{widths[0]}", "> 0",
                 runs.paired(wide, narrow, _active_units), (">", 0),
                 unit="units"),
        Quantity(f"nonzero, depth {depths[-1]} − {depths[0]} (mean over "
                 f"MLPs)", "< 0",
                 runs.paired(deep, shallow, _final_eval), ("<", 0)),
    ]
    if int(depths[-1]) >= 3:  # has a middle
        quantities.append(Quantity(
            f"depth {depths[-1]}: first & last − middle MLPs", "> 0",
            runs.per_seed(deep, _edges_minus_middle), (">", 0)))
    return quantities


def _claim3(roles, runs):
    """The fall of the nonzero share without real labels, inputs or
    repetition; random against clean labels (no claim: no verdict)."""
    paper = "> 0 (numbers not published)"
    return [
        Quantity("ViT, random labels: fall during training, init − final",
                 paper, runs.per_seed(roles["random_labels"], _fall),
                 (">", 0)),
        Quantity("ViT, random inputs: fall during training, init − final",
                 paper, runs.per_seed(roles["random_inputs"], _fall),
                 (">", 0)),
        Quantity("T5, unlimited stream: fall during training, init − "
                 "final", paper, runs.per_seed(roles["unlimited"], _fall),
                 (">", 0)),
        Quantity("random − clean labels, nonzero after training",
                 "not published",
                 runs.paired(roles["random_labels"], roles["claim1_vit"],
                             _final_eval), ("<", 0), judged=False),
    ]


def _claim4(roles, runs):
    """Per k, Top-k minus dense paired by seed (the paper's Table 1): clean
    accuracy, accuracy under each label noise (trained noisy, tested
    clean) and each corruption (trained clean), ECE."""
    cells = roles["claim4"]
    topks = sorted({key.split("/")[0] for key in cells} - {"dense"},
                   key=lambda s: -int(s[3:]))
    noises = sorted({key.split("/")[1] for key in cells})
    measured = runs.of(cells["dense/noise0"])[0]["report"]["robustness"][
        "corruptions"]
    # Each corruption holds its severities and their "mean".
    severities = {name: len(levels) - 1 for name, levels in measured.items()}
    quantities = []
    for topk in topks:
        pairs = {noise: (cells[f"{topk}/{noise}"], cells[f"dense/{noise}"])
                 for noise in noises}
        label = f"Top-{topk[3:]} − dense"
        quantities.append(Quantity(
            f"{label}: clean accuracy", "−0.02 (≈ 0)",
            runs.paired(*pairs["noise0"], _accuracy), ("≈", 0, 1)))
        quantities += [Quantity(
            f"{label}: accuracy, {float(noise[5:]):.0%} label noise",
            _paper(noise), runs.paired(*pairs[noise], _accuracy), (">", 0))
            for noise in noises[1:]]
        quantities += [Quantity(
            f"{label}: accuracy, {name.replace('_', ' ')} ({count} "
            f"severities)", _paper(name),
            runs.paired(*pairs["noise0"], _corrupted(name)), (">", 0))
            for name, count in severities.items()]
        quantities.append(Quantity(
            f"{label}: ECE, clean (15 bins)", _paper("ece"),
            runs.paired(*pairs["noise0"], _ece), ("<", 0)))
    return quantities


def _paper(key):
    """Table 1's Top-k minus dense for `key`, as the tables give it."""
    paper = PAPER_TABLE1.get(key)
    return f"{paper:+.2f}" if paper is not None else "not published"


# What each quantity reads of a run (`study.json`'s "runs"), in percent.

def _init_eval(r):
    return 100 * _mean_layers(r["init_nonzero"]["eval"])


def _final_eval(r):
    return 100 * r["report"]["mean_nonzero_fraction"]


def _fall(r):
    return _init_eval(r) - _final_eval(r)


def _fall_of(layer):
    return lambda r: 100 * (r["init_nonzero"]["eval"][layer]
                            - r["report"]["nonzero_fraction"][layer])


def _train_minus_eval(r):
    return 100 * (_mean_layers(_final_train(r["report"]))
                  - r["report"]["mean_nonzero_fraction"])


def _active_units(r):
    """Active units per token, mean over MLPs (not in percent)."""
    return r["report"]["mean_nonzero_fraction"] * r["config"]["model"][
        "mlp_dim"]


def _edges_minus_middle(r):
    values = [r["report"]["nonzero_fraction"][l]
              for l in _layers(r["report"])]
    if len(values) < 3:
        return float("nan")
    return 100 * (np.mean([values[0], values[-1]]) - np.mean(values[1:-1]))


def _accuracy(r):
    return 100 * r["report"]["eval"]["accuracy"]


def _corrupted(name):
    return lambda r: 100 * r["report"]["robustness"]["corruptions"][name][
        "mean"]["accuracy"]


def _ece(r):
    return 100 * r["report"]["eval"]["expected_calibration_error"]


def _layers(report):
    return list(report["nonzero_fraction"])


def _mean_layers(values):
    return float(np.mean(list(values.values())))


def _final_train(report):
    return {layer: report["history"][f"{layer}/nonzero_fraction"][-1]
            for layer in _layers(report)}


def curves(result):
    """`(steps, {"train": {layer: [...]}, "eval": {...}})` in percent,
    from step 0 (measured before training) to the end: the trainer's
    per-epoch `<layer>/nonzero_fraction` (the epoch's training batches) and
    `val_<layer>/nonzero_fraction` (the evaluation split)."""
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


# === Figures ===

def plot(figure, runs, roles, confidence):
    """Draws `FIGURES` on `figure(name, rows, columns, figsize)`'s axes."""
    _plot_claim1(figure, runs, roles, confidence)
    _plot_claim2(figure, runs, roles, confidence)
    _plot_claim3(figure, runs, roles, confidence)
    _plot_claim4(figure, runs, roles, confidence)


def _cell_curves(runs, cell, split):
    """`(steps, {layer: [curve per seed]}, layers)` of the cell's runs."""
    steps, per_layer, layers = None, {}, None
    for result in runs.of(cell):
        steps, values = curves(result)
        layers = list(values[split])
        for layer in layers:
            per_layer.setdefault(layer, []).append(values[split][layer])
    return steps, per_layer, layers


def _plot_claim1(figure, runs, roles, conf):
    """Per MLP, train (solid) and eval (dashed) from step 0."""
    import matplotlib

    fig, axes = figure("claim1_sparsity_over_training.png", 1, 2, (12, 4.5))
    for ax, model in zip(axes, ("vit", "t5")):
        cell = roles[f"claim1_{model}"]
        seeds = runs.of(cell)
        colors = matplotlib.colormaps["viridis"](np.linspace(
            0, 0.9, len(_layers(seeds[0]["report"]))))
        for split, style in (("train", "-"), ("eval", "--")):
            steps, per_layer, layers = _cell_curves(runs, cell, split)
            for color, layer in zip(colors, layers):
                band(ax, steps, per_layer[layer], f"{layer} ({split})",
                     style, color, conf)
        ax.axhline(50, color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel="training step (0: before training)",
               ylabel="nonzero MLP activations (%)",
               title=f"{NAMES[model]} ({cell}, {len(seeds)} seeds)")
        ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.suptitle("Claim 1: nonzero share per MLP over training, train "
                 "(solid) and eval (dashed) data")


def _plot_claim2(figure, runs, roles, conf):
    """Width: nonzero share and active units; depth: nonzero per block."""
    fig, axes = figure("claim2_width_depth.png", 1, 2, (12, 4.5))
    widths = sorted(roles["width"], key=int)
    stats = [interval(runs.per_seed(roles["width"][w], _final_eval), conf)
             for w in widths]
    errorbar(axes[0], [int(w) for w in widths], stats, "nonzero share (%)")
    counts = [interval([r["report"]["mean_nonzero_fraction"] * int(w)
                        for r in runs.of(roles["width"][w])], conf)
              for w in widths]
    twin = axes[0].twinx()
    errorbar(twin, [int(w) for w in widths], counts,
             "active units per token", color="tab:orange", marker="s")
    axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="mlp_dim", ylabel="nonzero MLP activations (%), eval",
                title="Width: nonzero share and count after training")
    twin.set_ylabel("active units per token")
    handles = axes[0].get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    axes[0].legend(handles[0] + more[0], handles[1] + more[1], fontsize=8)
    for depth in sorted(roles["depth"], key=int):
        seeds = runs.of(roles["depth"][depth])
        layers = _layers(seeds[0]["report"])
        stats = [interval([100 * r["report"]["nonzero_fraction"][l]
                           for r in seeds], conf) for l in layers]
        errorbar(axes[1], list(range(1, len(layers) + 1)), stats,
                 f"depth {depth}")
    axes[1].xaxis.set_major_locator(integer_ticks())
    axes[1].set(xlabel="block (1 = first)",
                ylabel="nonzero MLP activations (%), eval",
                title="Depth: nonzero share per block after training")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Claim 2: ViT, mean over seeds, {round(100 * conf)}% "
                 f"t-intervals")


def _plot_claim3(figure, runs, roles, conf):
    """Mean over MLPs, eval data, from step 0."""
    fig, ax = figure("claim3_random.png", 1, 1, (7.5, 4.5))
    for role, label in (("claim1_vit", "ViT, clean labels"),
                        ("random_labels", "ViT, random labels"),
                        ("random_inputs", "ViT, random inputs"),
                        ("unlimited", "T5, unlimited stream")):
        steps, per_layer, layers = _cell_curves(runs, roles[role], "eval")
        mean = np.mean([per_layer[l] for l in layers], axis=0)
        band(ax, steps, mean, label, confidence=conf)
    ax.axhline(50, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="training step (0: before training)",
           ylabel="nonzero MLP activations (%), eval, mean over MLPs",
           title="Claim 3: sparsity without real labels, inputs or "
                 "repetition")
    ax.legend(fontsize=8)


def _plot_claim4(figure, runs, roles, conf):
    """Accuracy under label noise and corruptions, ECE."""
    fig, axes = figure("claim4_topk.png", 1, 3, (15, 4.5))
    cells = roles["claim4"]
    models = sorted({key.split("/")[0] for key in cells},
                    key=lambda s: (s != "dense", -int(s[3:] or 0)
                                   if s != "dense" else 0))
    noises = sorted({key.split("/")[1] for key in cells})
    corruptions = list(runs.of(cells["dense/noise0"])[0]["report"][
        "robustness"]["corruptions"])
    for i, model in enumerate(models):
        label = "dense ReLU" if model == "dense" else f"Top-{model[3:]}"
        stats = [interval(runs.per_seed(cells[f"{model}/{n}"], _accuracy),
                          conf) for n in noises]
        errorbar(axes[0], [100 * float(n[5:]) + 1.5 * i for n in noises],
                 stats, label)
        clean = cells[f"{model}/noise0"]
        stats = [interval(runs.per_seed(clean, _corrupted(c)), conf)
                 for c in corruptions]
        errorbar(axes[1], [j + 0.15 * i for j in range(len(corruptions))],
                 stats, label, linestyle="none")
        errorbar(axes[2], [i], [interval(runs.per_seed(clean, _ece), conf)],
                 label, linestyle="none")
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
