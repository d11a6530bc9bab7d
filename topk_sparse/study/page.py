"""The study's results page and figures, of its summary (`study.json`).

`results_page(summary)` is `<workdir>/README.md`: what ran, the figures,
one table per claim (`tables`); `plot(summary, workdir)` draws the figures
of each part the summary holds (`topk_sparse.study.parts.PARTS`).
"""

import math
import os

from topk_sparse.study.parts import PARTS
from topk_sparse.study.stats import Runs

FIGURES = {name: shows for part in PARTS.values()
           for name, shows in part.FIGURES.items()}
"""The figures `plot` draws, `{file name: what it shows}`, each part's."""

_TITLES = {table: title for part in PARTS.values()
           for table, title in part.TITLES.items()}


def _parts_of(summary):
    """The parts whose tables `summary` holds."""
    return [part for part in PARTS.values()
            if set(part.TITLES) & set(summary["claims"])]


def figures_of(summary):
    """The names of `FIGURES` that `plot` draws for `summary`."""
    return [name for part in _parts_of(summary) for name in part.FIGURES]


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
        "`topk_sparse/study/stats.py`.", "",
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
             f"percentage points. Verdict rules: topk_sparse/study/stats.py.", ""]
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


def _fmt(value, digits=2):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def plot(summary, workdir=None, dpi=110):
    """The study's figures, `{file name: matplotlib Figure}`
    (`figures_of(summary)`: `claim1_sparsity_over_training.png` ...
    `claim4_topk.png`, `allocation.png`); with `workdir`, each is also
    written there as that PNG at `dpi`.

    Drawn on `Figure`s that pyplot never sees, so that no backend is
    switched: in a notebook, `display(figure)` shows one inline.
    """
    from matplotlib.figure import Figure

    figures = {}

    def figure(name, rows, columns, figsize):
        figures[name] = Figure(figsize=figsize, dpi=dpi)
        return figures[name], figures[name].subplots(rows, columns)

    runs = Runs(summary["runs"])
    for part in _parts_of(summary):
        part.plot(figure, runs, summary["roles"], summary["confidence"])
    for name, fig in figures.items():
        fig.tight_layout()
        if workdir is not None:
            fig.savefig(os.path.join(workdir, name))
    return figures
