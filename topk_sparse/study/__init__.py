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

The modules:
- `parts`: the parts of the study by name (`PARTS`), and the grid and the
  tables' rows, which read them; each part is a module of its own:
  - `claims`: the paper's claims 1-4 (*The Lazy Neuron Phenomenon*, arXiv
    2210.06313), which share their cells;
  - `allocation`: choosing k (`topk_sparse.allocation`), one k per MLP
    allocated against the same k everywhere (not in the paper);
- `cells`: the grid's cells and the order of their runs;
- `stats`: t-intervals over seeds, the verdict rules, table rows;
- `runner`: training the runs (resuming, shared between processes), the
  step-0 sparsity, the summary;
- `page`: the results page, the tables and the figures.

A new part of the study is one module like `claims` and one entry in
`parts.PARTS`.
"""

from topk_sparse.data.random_images import RANDOM_IMAGES
from topk_sparse.study.cells import cell_name
from topk_sparse.study.claims import curves
from topk_sparse.study.page import (FIGURES, figures_of, plot, results_page,
                                    tables)
from topk_sparse.study.parts import PARTS, aggregate, grid
from topk_sparse.study.runner import initial_nonzero, run
from topk_sparse.study.stats import interval, verdict

__all__ = [
    "FIGURES",
    "PARTS",
    "RANDOM_IMAGES",
    "aggregate",
    "cell_name",
    "curves",
    "figures_of",
    "grid",
    "initial_nonzero",
    "interval",
    "plot",
    "results_page",
    "run",
    "tables",
    "verdict",
]
