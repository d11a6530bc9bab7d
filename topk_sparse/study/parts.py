"""The study's parts, by name, and what reads them: the grid, the rows.

A part is a module that gives
- `cells(study, bases, grid)`: adds its cells to `grid` (a
  `topk_sparse.study.cells.Cells`) from the study config and `bases`
  (`{"vit": ..., "t5": ...}`, the base training configs); returns its
  roles, `{role: cell or {key: cell}}` (which cell answers what);
- `rows(roles, runs, confidence)`: its tables of the finished runs (a
  `stats.Runs`), `{table: [row]}` (`stats.Quantity.row`); `{}` when
  `roles` holds none of its cells;
- `TITLES`: `{table: heading}` on the results page;
- `FIGURES`: `{file name: what it shows}`;
- `plot(figure, runs, roles, confidence)`: draws its `FIGURES`, each on
  `figure(name, rows, columns, figsize)`'s axes.

A new part is one such module and one entry in `PARTS`: the grid, the
tables, the results page and the plots read it from there.
"""

import copy

from topk_sparse.models import vit as vit_lib
from topk_sparse.study import allocation, cells as cells_lib, claims, stats

PARTS = {"claims": claims, "allocation": allocation}
"""`study.parts`: the paper's claims 1-4 (which share their cells), and
choosing k (`topk_sparse.allocation`, allocated against uniform k)."""


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
                         f"from {tuple(PARTS)}.")
    cells = cells_lib.Cells(workdir)
    roles = {}
    for name, part in PARTS.items():
        if name in study.parts:
            roles.update(part.cells(study, {"vit": vit, "t5": study.t5},
                                    cells))
    return cells.runs(), roles


def aggregate(results, roles, confidence=0.95):
    """Per table of each part, its rows: quantity, paper, test, mean,
    interval, verdict; only the parts `roles` holds."""
    runs = stats.Runs(results)
    tables = {}
    for part in PARTS.values():
        tables.update(part.rows(roles, runs, confidence))
    return tables
