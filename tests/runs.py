"""Running the trainers in tests: configs, subprocesses and what a
finished run must hold, shared by the TensorFlow and the JAX trainer
tests."""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np

from tests.backend import JAX_XLA_FLAGS
from tests.events import read_events, read_scalars
from topk_sparse.configs import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def run_python(args, backend=None, **kwargs):
    """`python *args` in the repository, started (not waited for), on
    `backend` (default: this process's)."""
    backend = backend or keras.config.backend()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "KERAS_BACKEND": backend}
    if backend == "jax":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {JAX_XLA_FLAGS}"
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def vit_config(strategy):
    """The runlocal ViT of configs/vit_digits.py that `check_vit_run`
    checks: two-stage scoring at rank 8 (of width 32), 64 candidates (of
    mlp_dim 128); k allocated at mean 16 in steps of 8 on 64 training
    examples."""
    config = load_config("vit_digits", "runlocal")
    config.strategy = strategy
    config.eval.two_stage.rank = 8
    config.eval.two_stage.candidates = 64
    config.eval.allocate.mean_k = 16
    config.eval.allocate.examples = 64
    config.eval.allocate.step = 8
    return config


# What the runlocal T5 of `check_t5_run` evaluates: two-stage scoring at
# rank 16 (inputs are (encoder, decoder) dicts); k allocated at mean 48 in
# steps of 16 on 32 training examples.
T5_EVALUATIONS = {"eval.two_stage.rank": 16, "eval.allocate.mean_k": 48,
                  "eval.allocate.step": 16, "eval.allocate.examples": 32}


def t5_config(strategy):
    """The runlocal T5 of configs/t5_synthetic.py that `check_t5_run`
    checks, with `T5_EVALUATIONS`."""
    config = load_config("t5_synthetic", "runlocal")
    config.strategy = strategy
    config.update_from_flattened_dict(T5_EVALUATIONS)
    return config


def flags(overrides):
    """`{dotted config key: value}` as the binaries' flags."""
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def check_allocation(workdir, report, mean_k):
    """The `"allocation"` evaluation: a k per MLP within the budget, test
    metrics at it and at uniform k, each MLP's profile, TensorBoard."""
    result = report["allocation"]
    names = list(report["nonzero_fraction"])
    assert list(result["k"]) == names == list(result["layers"])
    assert sum(result["k"].values()) == mean_k * len(names)
    assert all(1 <= k <= report["mlp_k"][name]
               for name, k in result["k"].items())
    assert set(result["uniform"]) == set(result["allocated"]) == {
        key for key in report["eval"] if key != "exact_match"}
    # The greedy search minimizes the distance on these examples: at most
    # uniform's where uniform is one of the allocations it passes.
    assert 0 <= result["distance"] and 0 <= result["uniform_distance"]
    for layer in result["layers"].values():
        assert 0 < layer["active_mean"] <= layer["active_max"] <= \
            layer["mlp_dim"]
        assert layer["curve"][str(layer["mlp_dim"])] == {"cosine": 1.0,
                                                          "share": 1.0}
    logs = read_scalars(os.path.join(workdir, "tensorboard", "allocation"))
    step = report["train_steps"]
    for name, k in result["k"].items():
        assert logs[f"allocation/k/{name}"][step] == k
    np.testing.assert_allclose(
        logs["allocation/allocated/loss"][step],
        result["allocated"]["loss"], rtol=1e-6)


def check_workdir(workdir, config, report):
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == json.loads(config.to_json())
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    assert os.path.exists(os.path.join(workdir, "model.keras"))
    assert os.path.exists(os.path.join(workdir, "backup",
                                       "state.weights.h5"))


def check_vit_run(workdir, config, report):
    """The run of `vit_config`: its report, TensorBoard runs and
    evaluations."""
    check_workdir(workdir, config, report)
    assert report["backend"] == keras.config.backend()
    assert report["epochs_run"] == [0, 1]
    assert report["train_steps"] == 2 * 3
    assert 0.0 <= report["eval"]["accuracy"] <= 1.0
    assert np.isfinite(report["eval"]["loss"])
    # Top-32 of mlp_dim 128, per MLP in depth order, measured on test data.
    assert list(report["nonzero_fraction"]) == [
        "encoder_block_0_mlp", "encoder_block_1_mlp"]
    assert report["mlp_dim"] == {"encoder_block_0_mlp": 128,
                                 "encoder_block_1_mlp": 128}
    assert report["mlp_k"] == {"encoder_block_0_mlp": 32,
                               "encoder_block_1_mlp": 32}
    for value in report["nonzero_fraction"].values():
        assert 0.0 < value <= 32 / 128
    # TensorBoard got the losses per epoch, and each MLP's sparsity once:
    # from SparsityCallback, not again from the fit logs.
    train_logs = read_scalars(os.path.join(workdir, "tensorboard", "train"))
    assert set(train_logs["epoch_loss"]) == {0, 1}
    np.testing.assert_allclose(
        train_logs["epoch_loss"][1], report["history"]["loss"][1], rtol=1e-6)
    assert not [tag for tag in train_logs if "nonzero_fraction" in tag]
    assert 0 < report["history"]["encoder_block_1_mlp/nonzero_fraction"][1] \
        <= 0.25
    eval_logs = read_scalars(os.path.join(workdir, "tensorboard",
                                          "validation"))
    assert set(eval_logs["epoch_accuracy"]) == {0, 1}
    assert set(eval_logs["epoch_expected_calibration_error"]) == {0, 1}
    sparsity_logs = read_scalars(os.path.join(workdir, "tensorboard",
                                              "sparsity"))
    # Written against optimizer steps: 3 per epoch.
    assert set(sparsity_logs["sparsity/encoder_block_0_mlp/nonzero_fraction"]
               ) == {3, 6}
    assert 0 <= report["dead_fraction"]["encoder_block_1_mlp"] < 1
    assert 0 <= report["eval"]["expected_calibration_error"] <= 1
    assert report["label_noise"] == 0.0
    # Calibration curves per epoch, the reliability diagram as an image.
    calibration_logs = read_scalars(os.path.join(workdir, "tensorboard",
                                                 "calibration"))
    np.testing.assert_allclose(
        calibration_logs["calibration/expected_calibration_error"][6],
        report["eval"]["expected_calibration_error"], rtol=1e-5)
    assert set(calibration_logs["calibration/brier_score"]) == {3, 6}
    assert "calibration/reliability_diagram" in read_events(
        os.path.join(workdir, "tensorboard", "calibration"))[0]
    # Every corruption at severities 1 and 5, clean numbers equal evaluate's.
    robust = report["robustness"]
    assert list(robust["corruptions"]) == list(common.CORRUPTIONS)
    assert set(robust["corruptions"]["contrast"]) == {"1", "5", "mean"}
    np.testing.assert_allclose(robust["clean"]["accuracy"],
                               report["eval"]["accuracy"], rtol=1e-6)
    robust_logs = read_scalars(os.path.join(workdir, "tensorboard",
                                            "robustness"))
    np.testing.assert_allclose(
        robust_logs["robustness/mean/accuracy"][6],
        robust["mean"]["accuracy"], rtol=1e-6)
    # Two-stage scoring, fitted after training, measured on test tokens.
    two_stage = report["two_stage"]
    assert (two_stage["rank"], two_stage["candidates"]) == (8, 64)
    assert list(two_stage["layers"]) == list(report["nonzero_fraction"])
    for quality in two_stage["layers"].values():
        assert 0 < quality["recall"] <= 1 and -1 <= quality["cosine"] <= 1
    np.testing.assert_allclose(two_stage["recall"], np.mean(
        [q["recall"] for q in two_stage["layers"].values()]))
    two_stage_logs = read_scalars(os.path.join(workdir, "tensorboard",
                                               "two_stage"))
    np.testing.assert_allclose(two_stage_logs["two_stage/cosine"][6],
                               two_stage["cosine"], rtol=1e-6)
    check_allocation(workdir, report, 16)


def check_t5_run(workdir, config, report):
    """The run of `t5_config`."""
    check_workdir(workdir, config, report)
    assert report["backend"] == keras.config.backend()
    assert report["model"] == "t5" and report["train_steps"] == 2 * 3
    assert 0.0 <= report["eval"]["token_accuracy"] <= 1.0
    assert 0.0 <= report["eval"]["exact_match"] <= 1.0
    assert report["nonzero_fraction"]
    for value in report["nonzero_fraction"].values():
        assert 0.0 < value <= 0.5
    # Encoder and decoder MLPs; candidates default to 4 k = all 256.
    assert report["two_stage"]["candidates"] == 256
    assert list(report["two_stage"]["layers"]) == list(
        report["nonzero_fraction"])
    # Every neuron rescored exactly: the exact top-k up to float rounding.
    assert report["two_stage"]["recall"] > 0.999
    check_allocation(workdir, report, 48)
