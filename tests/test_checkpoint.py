"""A workdir that cannot lie, backups that survive a kill, exact resume.

The probes of the reliability issue, kept as tests: reused workdirs with
another config, deleted or damaged backups, SIGKILL mid-run, bad schedule
values, a trained model loaded after `import topk_sparse` only.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import pytest

import trainers
from tests.runs import load_config, run_python
from topk_sparse import SparseMLP, checkpoint, checks, training

# What may differ between a killed-and-resumed run and an uninterrupted one.
TIMES = ("wall_time_s", "train_time_s", "epochs_run")


def runlocal(**overrides):
    config = load_config("vit_digits", "runlocal")
    config.eval.corruptions = ()
    config.verbose = 0
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished runlocal workdir and its report."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    return workdir, training.train(runlocal(), workdir)


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.slow
@pytest.mark.xdist_group("finished")
@pytest.mark.parametrize("override, named", [
    ({"model.k": None}, "model.k: 32 -> None"),
    ({"model.mlp_dim": 64}, "model.mlp_dim: None -> 64"),
    ({"data.label_noise": 0.4}, "data.label_noise: 0.0 -> 0.4"),
    ({"optimizer.learning_rate": 0.1}, "optimizer.learning_rate")])
def test_a_workdir_refuses_another_trained_config(finished, override, named):
    workdir, _ = finished
    before = read(os.path.join(workdir, "report.json"))
    with pytest.raises(checks.ConfigError, match=named):
        training.train(runlocal(**override), workdir)
    assert read(os.path.join(workdir, "report.json")) == before


@pytest.mark.slow
@pytest.mark.xdist_group("finished")
def test_evaluation_keys_may_change_and_only_evaluate(finished, tmp_path):
    workdir, report = finished
    again = training.train(runlocal(**{"eval.batch_size": 32}), workdir)
    assert again["epochs_run"] == []  # nothing trained again
    assert again["history"] == report["history"]
    assert again["train_steps"] == report["train_steps"]
    assert again["eval"]["accuracy"] == pytest.approx(
        report["eval"]["accuracy"])


def test_default_workdir_is_one_per_trained_config():
    base = runlocal()
    same = runlocal(**{"eval.batch_size": 7, "verbose": 2})
    other = runlocal(**{"model.k": None})
    assert trainers.default_workdir(base) == trainers.default_workdir(same)
    assert trainers.default_workdir(base) != trainers.default_workdir(other)


@pytest.mark.slow
def test_default_workdir_root_does_not_shadow_the_package(tmp_path):
    # Python started in the temp folder (a notebook's, a script's) puts it
    # first on sys.path; a folder there named like the package would be a
    # namespace package in place of the installed one.
    root = os.path.dirname(trainers.default_workdir(runlocal()))
    assert os.path.dirname(root) == tempfile.gettempdir()
    os.makedirs(tmp_path / os.path.basename(root) / "vit_digits-0")
    probe = subprocess.run(
        [sys.executable, "-c", "import topk_sparse; topk_sparse.SparseMLP"],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert probe.returncode == 0, probe.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("finished")
def test_backup_is_one_consistent_file(finished):
    workdir, report = finished
    backup = os.path.join(workdir, "backup")
    assert sorted(os.listdir(backup)) == [checkpoint.PREVIOUS,
                                          checkpoint.LATEST]
    model = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    progress = checkpoint.restore(model, backup)
    # The step count is the optimizer's, stored with its weights.
    assert int(model.optimizer.iterations.numpy()) == report["train_steps"]
    assert progress["history"] == report["history"]
    assert progress["train_time_s"] == pytest.approx(report["train_time_s"],
                                                     abs=0.01)


@pytest.mark.slow
@pytest.mark.xdist_group("finished")
def test_a_finished_run_without_its_backup_is_not_retrained(finished,
                                                            tmp_path):
    workdir, _ = finished
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    for name in ("config.json", "report.json"):
        with open(os.path.join(copy, name), "wb") as f:
            f.write(read(os.path.join(workdir, name)))
    before = read(os.path.join(copy, "report.json"))
    with pytest.raises(RuntimeError, match="no backup"):
        training.train(runlocal(), copy)
    assert read(os.path.join(copy, "report.json")) == before


@pytest.mark.slow
def test_a_damaged_backup_names_the_file_and_what_to_do(tmp_path):
    workdir = str(tmp_path)
    training.train(runlocal(), workdir)
    latest = os.path.join(workdir, "backup", checkpoint.LATEST)
    with open(latest, "r+b") as f:
        f.truncate(100)
    before = read(os.path.join(workdir, "report.json"))
    with pytest.raises(RuntimeError, match=rf"Backup {latest} cannot be "
                       rf"read.*delete it.*move .*previous.weights.h5"):
        training.train(runlocal(), workdir)
    assert read(os.path.join(workdir, "report.json")) == before


@pytest.mark.slow
def test_a_kill_between_the_two_renames_resumes_from_previous(tmp_path):
    workdir = str(tmp_path / "run")
    report = training.train(runlocal(), workdir)
    os.remove(os.path.join(workdir, "backup", checkpoint.LATEST))
    os.remove(os.path.join(workdir, "report.json"))
    again = training.train(runlocal(), workdir)
    assert again["epochs_run"] == [1]  # the last epoch, trained again
    assert again["history"] == report["history"]


@pytest.mark.parametrize("key, value", [("epochs", 0), ("epochs", -1),
                                        ("batch_size", 0),
                                        ("steps_per_epoch", -3)])
def test_bad_schedule_values_fail_before_anything_is_written(tmp_path, key,
                                                             value):
    with pytest.raises(checks.ConfigError, match=f"config.{key} must be a "
                       f"positive int"):
        training.train(runlocal(**{key: value}), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_killed_run_resumes_to_the_same_report(tmp_path, backend):
    """SIGKILL after the first backups; the resumed run's report equals an
    uninterrupted run's, history and metrics bit for bit, on each
    backend. On one device: three processes on two loaded cores starved
    JAX's logical CPU devices' collectives (XLA aborted a run after 40 s
    in CI); data parallel training is tests/test_training_jax.py's."""
    args = ["-m", "trainers.vit", "--config=configs/vit_digits.py:runlocal",
            "--config.epochs=12", "--config.eval.corruptions=()",
            "--config.strategy=cpu"]
    straight = run_python([*args, f"--workdir={tmp_path / 'straight'}"],
                          backend)

    workdir = str(tmp_path / "killed")
    first = run_python([*args, f"--workdir={workdir}"], backend)
    backup = os.path.join(workdir, "backup", checkpoint.PREVIOUS)
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None \
            and not os.path.exists(backup):  # two epochs backed up
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed:\n" \
        + first.communicate()[0]
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert not os.path.exists(os.path.join(workdir, "report.json"))

    second = run_python([*args, f"--workdir={workdir}"], backend)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    assert "Resumed from epoch" in output
    assert straight.wait(timeout=300) == 0, straight.communicate()[0]

    def report(path):
        with open(os.path.join(path, "report.json")) as f:
            return {k: v for k, v in json.load(f).items() if k not in TIMES}

    resumed = report(workdir)
    assert resumed == report(tmp_path / "straight")
    assert len(resumed["history"]["loss"]) == 12
    assert resumed["train_steps"] == 12 * 3
    assert resumed["backend"] == backend


@pytest.mark.slow
@pytest.mark.xdist_group("finished")
def test_a_backup_resumes_on_its_own_backend_only(finished):
    workdir, _ = finished  # trained on TensorFlow
    before = read(os.path.join(workdir, "report.json"))
    process = run_python(["-m", "trainers.vit",
                          "--config=configs/vit_digits.py:runlocal",
                          "--config.eval.corruptions=()", "--config.verbose=0",
                          f"--workdir={workdir}"], backend="jax")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 1, output
    assert output.strip().splitlines()[-1] == (
        f"FATAL config error: The backup in {workdir}/backup was written "
        f"under KERAS_BACKEND=tensorflow, this process runs jax: resume it "
        f"with KERAS_BACKEND=tensorflow, or use another --workdir.")
    assert read(os.path.join(workdir, "report.json")) == before


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_config_errors_are_one_line(tmp_path, backend):
    cases = [
        # Found while building the model: the backend's own checks.
        (["--config.model.k=999"], "FATAL config error: config.model: "
                                   "k=999 is larger"),
        (["--config.model.mlp_dim=0"], "FATAL config error: "
         "config.model: mlp_dim must be a positive int, got 0."),
        # Found before any backend work (TensorFlow's run tests them).
        (["--config.epochs=0"], "FATAL config error: config.epochs must "
                                "be a positive int, got 0."),
        (["--config=configs/nope.py"], "--config=configs/nope.py: no "
                                       "such file. Configs here: ")]
    for i, (flags, expected) in enumerate(
            cases if backend == "tensorflow" else cases[:2]):
        # A workdir each: a config error at build time leaves config.json.
        process = run_python(["-m", "trainers.vit", *flags,
                              f"--workdir={tmp_path / str(i)}"], backend)
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 1, output
        assert "Traceback" not in output and expected in output, output


@pytest.mark.slow
@pytest.mark.xdist_group("finished")
def test_a_trained_model_loads_after_import_topk_sparse(finished):
    workdir, _ = finished
    script = ("import keras, numpy as np, topk_sparse\n"
              f"model = keras.saving.load_model({workdir!r} + "
              f"'/model.keras')\n"
              "print(type(model).__name__, model.sparse_mlps().keys())\n")
    process = run_python(["-c", script])
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "ViT dict_keys(['encoder_block_0_mlp', 'encoder_block_1_mlp'])" \
        in output


def test_integral_numbers_are_accepted():
    mlp = SparseMLP(np.int64(16), k=np.int32(4), output_dim=np.int64(8))
    assert [type(v) for v in (mlp.mlp_dim, mlp.k, mlp.output_dim)] == [int] * 3
    for bad in (16.0, True, "16"):
        with pytest.raises(ValueError, match="mlp_dim must be a positive int"):
            SparseMLP(bad)
