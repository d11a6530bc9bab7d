"""The study's part "allocation": choosing k (not in the paper).

At the same mean k, one k per MLP allocated on a dense model
(`topk_sparse.allocation.allocate`) against the same k everywhere, on the
test split without fine-tuning (the dense runs' allocation evaluation) and
after fine-tuning each from the dense run of its seed (`config.model.k`
"auto:<mean k>" against k = mean k, `config.init_from`).

A part of the study (`topk_sparse.study.parts`): its cells (`cells`), its
quantities (`_quantities`), its table's heading and its figure.
"""

import numpy as np

from topk_sparse.study.cells import NAMES, changed
from topk_sparse.study.stats import (Quantity, errorbar, integer_ticks,
                                     interval)

# The test metric of each model of the allocation part (higher: better).
METRICS = {"vit": "accuracy", "t5": "token_accuracy"}

TITLES = {
    "allocation": "Choosing k: one k per MLP allocated vs uniform k at the "
                  "same mean k (paired by seed)",
}

FIGURES = {
    "allocation.png": "allocated vs uniform k at the same mean k, without "
                      "and with fine-tuning; the k chosen per MLP",
}


def cells(study, bases, grid):
    """Adds the allocation cells to `grid`: per model of
    `study.allocation`, its dense cell (evaluated at the allocated and the
    uniform k) and the two fine-tuned from it; returns their roles,
    `{"allocation": {"<model>/<dense|auto|uniform>": cell}}`."""
    roles = {}
    for name, base in bases.items():
        setting = study.allocation[name]
        model = {"depth": setting.depth} if name == "vit" else {}
        allocate = changed(base.eval.allocate, mean_k=setting.mean_k)
        dense = roles[f"{name}/dense"] = grid.add(
            base, study.claim4_seeds, model=model,
            eval_config={"allocate": allocate})
        # Fine-tuned: allocated as the dense runs' evaluation did.
        for key, k in (("auto", f"auto:{setting.mean_k:g}"),
                       ("uniform", setting.mean_k)):
            roles[f"{name}/{key}"] = grid.add(
                changed(base, epochs=setting.epochs), study.claim4_seeds,
                model={**model, "k": k}, source=dense,
                optimizer={"learning_rate": setting.learning_rate,
                           "warmup_steps": 0},
                eval_config={"allocate": changed(allocate, mean_k=0)})
    return {"allocation": roles}


def rows(roles, runs, confidence):
    """`{"allocation": rows}` of the finished `runs`; `{}` when `roles`
    holds no allocation cell."""
    if not roles.get("allocation"):
        return {}
    return {"allocation": [quantity.row(confidence) for quantity in
                           _quantities(roles["allocation"], runs)]}


def _quantities(cells, runs):
    """Per model, allocated minus uniform k at the same mean k, paired by
    seed: the test metric and loss without fine-tuning (the dense runs'
    evaluation) and after fine-tuning (the `auto` and `uniform` cells);
    and the allocated, fine-tuned model minus the dense one."""
    quantities = []
    for model, metric in METRICS.items():
        dense = cells.get(f"{model}/dense")
        if dense is None:
            continue
        label = f"{NAMES[model]}, {_budget(runs.of(dense))}"
        quantities += [_difference(
            f"{label}: allocated − uniform k, {_quantity(name)}, no "
            f"fine-tuning", name,
            runs.per_seed(dense, _allocated_minus_uniform(name)))
            for name in (metric, "loss")]
        auto, uniform = (cells.get(f"{model}/{key}")
                         for key in ("auto", "uniform"))
        if auto is None or uniform is None:
            continue
        quantities += [_difference(
            f"{label}: allocated − uniform k, {_quantity(name)}, "
            f"fine-tuned", name, runs.paired(auto, uniform, _tested(name)))
            for name in (metric, "loss")]
        quantities.append(Quantity(
            f"{label}: allocated and fine-tuned − dense, "
            f"{_quantity(metric)}", "not in the paper",
            runs.paired(auto, dense, _tested(metric)), ("≈", 0, 1)))
    return quantities


def _difference(quantity, name, values):
    """Allocated minus uniform k of metric `name`: the allocation should
    raise an accuracy and lower the loss."""
    loss = name == "loss"
    return Quantity(quantity, "not in the paper", values,
                    ("<" if loss else ">", 0),
                    unit="nats" if loss else "pts")


def _allocated_minus_uniform(name):
    """Of a dense run: its evaluation at the allocated minus the uniform
    k, without fine-tuning."""
    return lambda r: _scaled(name, r["report"]["allocation"]["allocated"][
        name]) - _scaled(name, r["report"]["allocation"]["uniform"][name])


def _tested(name):
    return lambda r: _scaled(name, r["report"]["eval"][name])


def _scaled(name, value):
    """A metric as the tables give it: accuracies in percent."""
    return value if name == "loss" else 100 * value


def _quantity(name):
    return "test loss" if name == "loss" else f"test {name.replace('_', ' ')}"


def _budget(runs):
    """"mean k <k> of <mlp_dim>", of a dense cell's `runs`."""
    report = runs[0]["report"]
    return (f"mean k {report['allocation']['mean_k']:g} of "
            f"{next(iter(report['mlp_dim'].values()))}")


def plot(figure, runs, roles, confidence):
    """allocation.png: per model, the test metric of uniform and allocated
    k without and with fine-tuning (the dense model's level dashed); the k
    allocated per MLP over the mean k."""
    cells = roles["allocation"]
    fig, axes = figure("allocation.png", 1, 3, (15, 4.5))
    stages = ("no fine-tuning", "fine-tuned")
    for ax, (model, metric) in zip(axes, METRICS.items()):
        dense = cells.get(f"{model}/dense")
        if dense is None:
            continue
        seeds = runs.of(dense)
        for i, key in enumerate(("uniform", "allocated")):
            stats = [interval([100 * r["report"]["allocation"][key][metric]
                               for r in seeds], confidence)]
            tuned = cells.get(f"{model}/{'auto' if i else 'uniform'}")
            if tuned is not None:
                stats.append(interval(runs.per_seed(tuned, _tested(metric)),
                                      confidence))
            errorbar(ax, [j + 0.06 * (2 * i - 1) for j in range(len(stats))],
                     stats, f"{key} k")
        ax.axhline(100 * np.mean([r["report"]["eval"][metric]
                                  for r in seeds]),
                   color="gray", linestyle="--", linewidth=1,
                   label="dense ReLU")
        ax.set_xticks(range(len(stages)), stages)
        ax.set_xlim(-0.5, len(stages) - 0.5)
        ax.set(xlabel="after sparsifying the dense model",
               ylabel=f"{_quantity(metric)} (%)",
               title=f"{NAMES[model]}: {_budget(seeds)}, {len(seeds)} seeds")
        ax.legend(fontsize=8)
        # The k allocated per MLP over the budget, mean over seeds.
        shares = np.array([[k / r["report"]["allocation"]["mean_k"]
                            for k in r["report"]["allocation"]["k"].values()]
                           for r in seeds])
        errorbar(axes[2], list(range(1, shares.shape[1] + 1)),
                 [interval(column, confidence) for column in shares.T],
                 NAMES[model])
    axes[2].axhline(1, color="gray", linestyle="--", linewidth=1,
                    label="uniform k")
    axes[2].xaxis.set_major_locator(integer_ticks())
    axes[2].set(xlabel="MLP in layer order (T5: encoder, then decoder)",
                ylabel="allocated k / mean k",
                title="k chosen per MLP (no fine-tuning)")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Choosing k: allocated vs uniform k at the same mean k, "
                 f"mean over seeds, {round(100 * confidence)}% t-intervals")
