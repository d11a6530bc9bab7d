"""The study's statistics: t-intervals over seeds, verdicts, table rows.

A quantity is measured once per seed (a run; a pair of runs of one seed
where two cells are compared). Its row in a table (`Quantity.row`) is its
mean over seeds with a two-sided t-interval, and the verdict of that
interval against the paper's claim:
- a sign ("> 0", "< 0"): agrees when the interval excludes 0 on the
  paper's side, does not when it excludes 0 on the other, else not
  significant;
- a level ("≈ 50 ± 5"): agrees when the interval lies inside, does not when
  it lies wholly outside, else not significant;
- a count ("all", `EveryMLP.row`): agrees when every MLP's interval is on
  the paper's side.

The figures draw the same intervals (`band`, `errorbar`).
"""

import dataclasses
import math

import numpy as np


class Runs:
    """The finished runs of a study (`study.json`'s "runs": dicts of name,
    cell, seed, config, init_nonzero, report) by cell and seed."""

    def __init__(self, results):
        self._by_cell = {}
        for result in results:
            self._by_cell.setdefault(result["cell"], {})[
                result["seed"]] = result

    def of(self, cell):
        """The cell's runs in seed order."""
        return [r for _, r in sorted(self._by_cell[cell].items())]

    def per_seed(self, cell, fn):
        """`fn` of each of the cell's runs, in seed order."""
        return [fn(r) for r in self.of(cell)]

    def paired(self, cell_a, cell_b, fn):
        """fn(a) - fn(b) over the seeds both cells ran."""
        a, b = self._by_cell[cell_a], self._by_cell[cell_b]
        return [fn(a[s]) - fn(b[s]) for s in sorted(set(a) & set(b))]


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


@dataclasses.dataclass
class Quantity:
    """One row of a table: a quantity over seeds against the paper's claim.

    Attributes:
      quantity: str. What it measures, the row's name.
      paper: str. The paper's number or claim, as the table gives it.
      values: list of float. Its value per seed (per pair of runs of a seed
        for a difference of two cells).
      test: tuple. The claim as a test of the interval: `(">", 0)`,
        `("<", 0)` or `("≈", target, margin)` (`verdict`).
      unit: str. Of `values`; "pts" (percentage points) by default.
      judged: bool. False where the paper publishes no claim: the row shows
        the side we expect, without a verdict ("—").
    """
    quantity: str
    paper: str
    values: list
    test: tuple
    unit: str = "pts"
    judged: bool = True

    def row(self, confidence):
        """The table row: quantity, paper, test, unit, the `interval` of
        `values`, the values and the verdict."""
        stat = interval(self.values, confidence)
        return {"quantity": self.quantity, "paper": self.paper,
                "test": _test_text(self.test), "unit": self.unit, **stat,
                "values": [float(v) for v in self.values],
                "verdict": verdict(stat, self.test) if self.judged else "—"}


@dataclasses.dataclass
class EveryMLP:
    """A count row: of the MLPs, how many have their quantity's interval on
    the side of `test`; the paper says all of them.

    Attributes:
      quantity: str. The row's name.
      values: list of lists of float. Per MLP, its values per seed.
      test: tuple. As `Quantity.test`.
    """
    quantity: str
    values: list
    test: tuple

    def row(self, confidence):
        per_mlp = [verdict(interval(values, confidence), self.test)
                   for values in self.values]
        passed, n = per_mlp.count("agrees"), len(per_mlp)
        return {"quantity": self.quantity, "paper": "all", "test": "all",
                "unit": "MLPs", "mean": passed, "low": None, "high": None,
                "n": n, "values": per_mlp, "text": f"{passed} of {n}",
                "verdict": "agrees" if passed == n else
                "does not" if "does not" in per_mlp else "not significant"}


def _test_text(test):
    if test[0] == "≈":
        return f"≈ {test[1]:g} ± {test[2]:g}"
    return f"{test[0]} {test[1]:g}"


# === Drawn ===

def band(ax, x, runs, label, style="-", color=None, confidence=0.95):
    """Mean over seeds of equal-length series (`runs`: one per seed), with
    the t-interval band."""
    runs = np.asarray(runs, np.float64)
    stats = [interval(runs[:, i], confidence) for i in range(runs.shape[1])]
    mean = [s["mean"] for s in stats]
    line, = ax.plot(x, mean, style, color=color, label=label)
    if stats[0]["low"] is not None:
        ax.fill_between(x, [s["low"] for s in stats],
                        [s["high"] for s in stats], color=line.get_color(),
                        alpha=0.15, linewidth=0)
    return line


def errorbar(ax, x, stats, label, color=None, marker="o", linestyle="-"):
    """`stats` (`interval`s) at `x`: the means with their intervals."""
    mean = np.array([s["mean"] for s in stats])
    low = np.array([s["mean"] if s["low"] is None else s["low"]
                    for s in stats])
    high = np.array([s["mean"] if s["high"] is None else s["high"]
                     for s in stats])
    ax.errorbar(x, mean, yerr=[mean - low, high - mean], label=label,
                color=color, marker=marker, linestyle=linestyle, capsize=3)


def integer_ticks():
    """A tick locator for an axis of counts (blocks, MLPs)."""
    import matplotlib.ticker
    return matplotlib.ticker.MaxNLocator(integer=True)
