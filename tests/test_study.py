"""The Lazy Neuron study: its statistics, its grid, and the quick study run
end to end (configs/study.py:quick, a few minutes on a 2-core CPU)."""

import json
import os

import matplotlib
import numpy as np
import pytest
from scipy import stats

from topk_sparse.configs import study as study_config
from topk_sparse import study, training
from topk_sparse.study import runner
from topk_sparse.workdir import config_fingerprint, write_json

VERDICTS = {"agrees", "does not", "not significant", "—"}


def test_interval_is_the_t_interval():
    values = [1.0, 2.0, 4.0, 7.0]
    got = study.interval(values, 0.95)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values),
                                 scale=stats.sem(values))
    assert got["n"] == 4 and got["mean"] == pytest.approx(3.5)
    assert (got["low"], got["high"]) == pytest.approx((low, high))
    assert study.interval([2.0])["low"] is None  # one seed: no interval


@pytest.mark.parametrize("low, high, test, expected", [
    (0.5, 2.0, (">", 0), "agrees"),
    (-2.0, -0.5, (">", 0), "does not"),
    (-1.0, 2.0, (">", 0), "not significant"),
    (-2.0, -0.5, ("<", 0), "agrees"),
    (48.0, 52.0, ("≈", 50, 5), "agrees"),
    (20.0, 30.0, ("≈", 50, 5), "does not"),
    (40.0, 52.0, ("≈", 50, 5), "not significant"),
    (None, None, (">", 0), "not significant"),
])
def test_verdicts(low, high, test, expected):
    stat = {"mean": 0.0, "low": low, "high": high, "n": 2}
    assert study.verdict(stat, test) == expected


def test_the_full_grid_shares_cells_and_orders_its_runs():
    config = study_config.get_config()
    runs, roles = study.grid(config)
    names = [r["name"] for r in runs]
    assert len(names) == len(set(names))
    # Claim 4: dense and each k at each label noise, claim4_seeds each.
    assert len(roles["claim4"]) == (1 + len(config.k)) * len(
        config.label_noise)
    for cell in roles["claim4"].values():
        assert sum(r["cell"] == cell for r in runs) == config.claim4_seeds
    # The base model is one cell of claims 1, 2 and 4.
    base = roles["claim4"]["dense/noise0"]
    assert roles["claim1_vit"] == base == roles["width"][str(
        config.vit.model.mlp_dim)] == roles["depth"]["2"]
    # Its runs carry the corruption evaluation; k below mlp_dim.
    assert all(tuple(r["config"].eval.corruptions) == tuple(
        config.corruptions) for r in runs if r["cell"] == base)
    assert all(k < config.vit.model.mlp_dim for k in config.k)
    # Every cell at seeds 0 and 1 first, then claim 4's other seeds, then
    # the others', then the fine-tunings.
    trained = [r for r in runs if r["source"] is None]
    assert runs[:len(trained)] == trained
    first = [r for r in trained if r["seed"] < 2]
    assert trained[:len(first)] == first
    assert {r["cell"] for r in first} == {r["cell"] for r in trained}
    claim4 = set(roles["claim4"].values())
    rest = [r["cell"] in claim4 for r in trained[len(first):]]
    assert rest == sorted(rest, reverse=True)


def test_the_allocation_cells_fine_tune_from_the_dense_run_of_their_seed():
    config = study_config.get_config("parts=allocation")
    runs, roles = study.grid(config, "/work")
    assert set(roles) == {"allocation"}
    cells = roles["allocation"]
    by_name = {r["name"]: r for r in runs}
    for model in ("vit", "t5"):
        setting = config.allocation[model]
        dense = [r for r in runs if r["cell"] == cells[f"{model}/dense"]]
        assert len(dense) == config.claim4_seeds
        for run in dense:  # evaluated at the allocation and uniform k
            assert run["config"].model.k is None
            assert run["config"].eval.allocate.mean_k == setting.mean_k
        if model == "vit":
            assert {r["config"].model.depth for r in dense} == {
                setting.depth}
        for key, k in (("auto", f"auto:{setting.mean_k}"),
                       ("uniform", setting.mean_k)):
            tuned = [r for r in runs if r["cell"] == cells[f"{model}/{key}"]]
            assert len(tuned) == config.claim4_seeds
            for run in tuned:
                source = by_name[run["source"]]
                assert source["cell"] == cells[f"{model}/dense"]
                assert source["seed"] == run["seed"]
                assert runs.index(source) < runs.index(run)
                assert run["config"].init_from == os.path.join(
                    "/work", "runs", source["name"])
                assert run["config"].model.k == k
                assert run["config"].epochs == setting.epochs
                assert run["config"].optimizer.learning_rate == \
                    setting.learning_rate
                assert run["config"].eval.allocate.mean_k == 0
                # "auto" allocates as the dense run's evaluation did.
                assert run["config"].eval.allocate.examples == \
                    source["config"].eval.allocate.examples
    config.parts = ("claims", "allocations")
    with pytest.raises(ValueError, match="Unknown study parts"):
        study.grid(config)


def test_a_fine_tuning_waits_for_its_source_in_another_process(
        tmp_path, monkeypatch):
    workdir = str(tmp_path)
    config = study_config.get_config("quick,parts=allocation")
    runs, roles = study.grid(config, workdir)
    trained = []

    def train(run_config, run_dir):
        if run_config.init_from:
            assert os.path.exists(os.path.join(run_config.init_from,
                                               "report.json"))
        trained.append(os.path.basename(run_dir))
        write_json(os.path.join(run_dir, "report.json"), {})
    monkeypatch.setattr(training, "train", train)
    monkeypatch.setattr(runner, "initial_nonzero", lambda *args: {})
    held = runs[0]  # a dense run another live process trains
    os.makedirs(os.path.join(workdir, "runs", held["name"]))
    with open(os.path.join(workdir, "runs", held["name"], "lock"),
              "w") as f:
        f.write(str(os.getppid()))
    assert study.run(config, workdir, log=lambda _: None) is None
    waiting = {r["name"] for r in runs if r["source"] == held["name"]}
    assert len(waiting) == 2
    assert set(trained) == {r["name"] for r in runs} - waiting - {
        held["name"]}


@pytest.mark.parametrize("folder", ["results", "results/allocation"])
def test_the_stored_results_page_is_the_page_of_the_stored_study(folder):
    results = os.path.join(os.path.dirname(__file__), "..", folder)
    with open(os.path.join(results, "study.json")) as f:
        summary = json.load(f)
    with open(os.path.join(results, "README.md")) as f:
        assert f.read() == study.results_page(summary), (
            f"{folder}/README.md is stale: write study.results_page of "
            f"{folder}/study.json into it")
    assert study.figures_of(summary)
    for name in study.figures_of(summary):
        assert os.path.exists(os.path.join(results, name)), name


def test_a_run_another_live_process_holds_is_left_to_it(tmp_path):
    run_dir = str(tmp_path / "run")
    assert runner._take(run_dir)  # free: taken, our pid written
    assert runner._take(run_dir)  # ours already
    with open(os.path.join(run_dir, "lock"), "w") as f:
        f.write(str(os.getppid()))  # a live process (pytest's parent)
    assert not runner._take(run_dir)
    with open(os.path.join(run_dir, "lock"), "w") as f:
        f.write("99999999")  # no such process: a killed study's lock
    assert runner._take(run_dir)
    with open(os.path.join(run_dir, "lock")) as f:
        assert int(f.read()) == os.getpid()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("study"))
    config = study_config.get_config("quick")
    return config, workdir, study.run(config, workdir, log=lambda _: None)


@pytest.mark.slow
@pytest.mark.xdist_group("quick_study")
def test_quick_study_writes_consistent_outputs(quick):
    config, workdir, summary = quick
    runs, roles = study.grid(config, workdir)
    with open(os.path.join(workdir, "study.json")) as f:
        saved = json.load(f)
    assert saved["grid"]["runs"] == len(runs) == len(saved["runs"])
    assert not any(os.path.exists(os.path.join(workdir, "runs", r["name"],
                                               "lock")) for r in runs)
    assert saved["roles"] == roles
    for result, spec in zip(saved["runs"], runs):
        run_dir = os.path.join(workdir, "runs", spec["name"])
        with open(os.path.join(run_dir, "report.json")) as f:
            assert json.load(f) == result["report"]
        with open(os.path.join(run_dir, "config.json")) as f:
            assert config_fingerprint(json.load(f)) == \
                config_fingerprint(spec["config"])
        init = result["init_nonzero"]
        if spec["source"]:  # a fine-tuning starts trained
            assert init is None
            continue
        assert set(init["eval"]) == set(result["report"]["nonzero_fraction"])
        k, mlp_dim = result["report"]["k"], result["config"]["model"][
            "mlp_dim"] if result["report"]["model"] == "vit" else None
        for value in init["eval"].values():
            if k is None:  # a fresh ReLU MLP fires about half its units
                assert 0.2 < value < 0.8
            else:
                assert 0 < value <= k / mlp_dim + 1e-6
    assert list(saved["claims"]) == ["claim1", "claim2", "claim3",
                                     "claim4", "allocation"]
    for claim, rows in saved["claims"].items():
        assert rows and all(row["verdict"] in VERDICTS for row in rows)
        for row in rows:
            if row["low"] is not None:
                assert row["low"] <= row["mean"] <= row["high"]
    # Claim 4 and allocation differences are paired over the claim-4 seeds:
    # per model, allocated - uniform accuracy and loss without and with
    # fine-tuning, and fine-tuned - dense.
    for claim in ("claim4", "allocation"):
        assert all(len(row["values"]) == config.claim4_seeds
                   for row in saved["claims"][claim])
    assert len(saved["claims"]["allocation"]) == 2 * 5
    by_name = {r["name"]: r for r in saved["runs"]}
    for result in saved["runs"]:
        if result["cell"] in (roles["allocation"]["vit/auto"],
                              roles["allocation"]["t5/auto"]):
            # Fine-tuned at the k the dense run's evaluation allocated.
            source = by_name[result["config"]["init_from"].split("/")[-1]]
            assert result["report"]["mlp_k"] == source["report"][
                "allocation"]["k"]
    with open(os.path.join(workdir, "README.md")) as f:
        text = f.read()
    assert text == study.results_page(saved)
    assert text.count("### Claim") == 4
    verdicts = [line.split("|")[-2].strip() for line in text.splitlines()
                if line.startswith("| ") and not line.startswith(
                    "| quantity")]
    assert verdicts == [row["verdict"] for rows in saved["claims"].values()
                        for row in rows]
    assert study.figures_of(saved) == list(study.FIGURES)
    for name in study.FIGURES:
        assert f"]({name})" in text
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The figures come back, and a notebook's inline backend stays.
    previous = matplotlib.get_backend()
    inline = "module://matplotlib_inline.backend_inline"
    matplotlib.use(inline)
    try:
        figures = study.plot(saved, dpi=40)
        assert matplotlib.get_backend() == inline
    finally:
        matplotlib.use(previous)
    assert list(figures) == [f"{name}.png" for name in (
        "claim1_sparsity_over_training", "claim2_width_depth",
        "claim3_random", "claim4_topk", "allocation")]
    assert all(figure.dpi == 40 and figure.axes
               for figure in figures.values())


@pytest.mark.slow
@pytest.mark.xdist_group("quick_study")
def test_a_finished_study_trains_nothing_again(quick, monkeypatch):
    config, workdir, summary = quick

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(training, "train", refuse)
    monkeypatch.setattr(runner, "initial_nonzero", refuse)
    again = study.run(config, workdir, log=lambda _: None)
    assert again["claims"] == summary["claims"]
