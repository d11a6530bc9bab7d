"""The trainers on the JAX backend: keras.distribution behind the strategy
names, the runlocal ViT and T5 runs with every evaluation, the study's
allocation part.

Runs in the JAX pass only (`conftest.JAX_ONLY`), over the two logical CPU
devices the conftest makes; kill and resume on JAX: test_checkpoint.py.
"""

import os

import jax
import keras
import pytest

from tests.runs import (check_t5_run, check_vit_run, load_config, run_python,
                        t5_config, vit_config)
from topk_sparse import distribute, study, training
from topk_sparse.configs import study as study_config


def test_strategy_names_mean_the_same_devices():
    one = distribute.get_strategy("cpu")
    assert (one.name, one.num_replicas_in_sync) == ("OneDevice", 1)
    mirrored = distribute.get_strategy("mirrored", num_cpu_devices=2)
    assert isinstance(mirrored.distribution, keras.distribution.DataParallel)
    assert mirrored.num_replicas_in_sync == 2 == len(jax.devices())
    assert distribute.get_strategy("mirrored") is mirrored  # one per process
    assert distribute.name_of(mirrored) == "DataParallel"
    # No TPU, no GPUs: auto is one device, as on TensorFlow.
    assert distribute.get_strategy("auto") is one
    with pytest.raises(RuntimeError, match="already runs with 2"):
        distribute.get_strategy("mirrored", num_cpu_devices=3)
    with pytest.raises(RuntimeError, match="No TPU found: JAX computes on "
                                           "cpu"):
        distribute.get_strategy("tpu")
    with pytest.raises(ValueError, match="leave tpu='local'"):
        distribute.get_strategy("auto", tpu="grpc://10.0.0.2:8470")
    with pytest.raises(ValueError, match="63 must be a positive multiple "
                                         "of the 2 replicas.*try 62"):
        distribute.per_replica_batch(63, mirrored)


@pytest.mark.slow
def test_vit_trains_data_parallel(tmp_path):
    config = vit_config("mirrored")
    workdir = str(tmp_path / "vit")
    report = training.train(config, workdir)
    check_vit_run(workdir, config, report)
    assert report["strategy"] == "DataParallel" and report["replicas"] == 2
    assert report["jit_compile"] is True


@pytest.mark.slow
def test_t5_trains_and_decodes(tmp_path):
    config = t5_config("cpu")
    workdir = str(tmp_path / "t5")
    report = training.train(config, workdir)
    check_t5_run(workdir, config, report)
    assert report["strategy"] == "OneDevice"


@pytest.mark.slow
def test_the_binary_runs_its_default_config_data_parallel(tmp_path):
    process = run_python(["-m", "trainers.t5",
                          "--config=configs/t5_synthetic.py:runlocal",
                          "--config.strategy=mirrored",
                          "--config.num_cpu_devices=2",
                          f"--workdir={tmp_path}"])
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    assert "DataParallel x2 on jax" in output


@pytest.mark.slow
def test_the_quick_study_allocation_part_on_one_seed(tmp_path):
    # The study on JAX: its allocation part (dense runs with their step-0
    # sparsity and allocation evaluation, fine-tunings from them with
    # init_from and k "auto:<mean k>"), one seed per cell. The claims
    # part's cells are trainings with other data and labels, trained on
    # JAX above; both parts, two seeds: tests/test_study.py.
    config = study_config.get_config("quick,parts=allocation")
    config.seeds = config.claim4_seeds = 1
    summary = study.run(config, str(tmp_path), log=lambda _: None)
    runs, _ = study.grid(config, str(tmp_path))
    assert summary["grid"]["runs"] == len(runs) == len(summary["runs"])
    assert {r["report"]["backend"] for r in summary["runs"]} == {"jax"}
    assert list(summary["claims"]) == ["allocation"]
    assert summary["claims"]["allocation"]
    assert any(r["report"].get("auto_k") for r in summary["runs"])
    for name in study.figures_of(summary):
        with open(os.path.join(tmp_path, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
