"""The grid's cells: the configs a part adds, each trained at every seed.

A cell is one training config; its runs are that config at seeds 0, 1, ...
(`<cell>-seed<i>`). Each part of the study adds its cells to one `Cells`
(`topk_sparse.study.parts.grid`), which names them (`cell_name`: cells
that parts share are trained once), gives each cell the evaluations of
every part that added it, and orders the runs.
"""

import copy
import os

NAMES = {"vit": "ViT", "t5": "T5"}
"""The grid's base models (`study.vit`, `study.t5`), as tables name them."""


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


def changed(section, **changes):
    """A copy of the ConfigDict `section` with `changes`."""
    section = copy.deepcopy(section)
    section.update(changes)
    return section


class Cells:
    """The cells the parts add, and their runs in training order.

    Args:
      workdir: str. The study's folder: a fine-tuning run's
        `config.init_from` is its source run's folder, `<workdir>/runs/<run>`.
    """

    def __init__(self, workdir=""):
        self.workdir = workdir
        self._runs = {}
        self._evals = {}
        self._early = set()

    def add(self, base, seeds, model=None, data_config=None,
            eval_config=None, source=None, optimizer=None, early=False):
        """Adds the cell of `base` with these changes at `seeds` seeds;
        returns its name.

        Args:
          base: ConfigDict. A training config (`study.vit`, `study.t5`).
          seeds: int. Runs at seeds 0 to `seeds - 1`.
          model, optimizer: dicts updating `config.model`,
            `config.optimizer`.
          data_config: ConfigDict. Replaces `config.data`.
          eval_config: dict. Updates `config.eval` of every run of the
            cell, whichever part added it.
          source: str. A cell this one fine-tunes: each run starts from
            the source's run of its seed (`config.init_from`).
          early: bool. The cell's seeds past the first two train before
            the other cells' (a study stopped early has them all).
        """
        config = copy.deepcopy(base)
        config.unlock()
        config.model.update(model or {})
        config.optimizer.update(optimizer or {})
        if data_config is not None:
            config.data = data_config
        if source is not None:
            config.init_from = "finetuned"  # named below, per seed
        cell = cell_name(config)
        self._evals.setdefault(cell, {}).update(eval_config or {})
        if early:
            self._early.add(cell)
        for seed in range(seeds):
            name = f"{cell}-seed{seed}"
            if name not in self._runs:
                run_config = copy.deepcopy(config)
                run_config.seed = seed
                parent = None if source is None else f"{source}-seed{seed}"
                if parent:
                    run_config.init_from = os.path.join(self.workdir, "runs",
                                                        parent)
                self._runs[name] = {"name": name, "cell": cell, "seed": seed,
                                    "config": run_config, "source": parent}
        return cell

    def runs(self):
        """The runs (dicts of name, cell, seed, config, and `source`: the
        run a fine-tuning starts from, or None), each with its cell's
        evaluations, in training order: every cell at 2 seeds first, then
        the early cells' other seeds, then the others', then the
        fine-tunings (after the runs they start from)."""
        for spec in self._runs.values():
            for key, value in self._evals[spec["cell"]].items():
                spec["config"].eval[key] = value
        return sorted(self._runs.values(), key=lambda r: (
            3 if r["source"] else 0 if r["seed"] < 2 else
            1 if r["cell"] in self._early else 2, r["seed"]))
