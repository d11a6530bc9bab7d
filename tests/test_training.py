"""distribute.py, training.train, the trainer binaries and their configs.

Runs the runlocal configs end to end (a few steps each): on one device with
jit_compile, under the shared MirroredStrategy with mixed precision, and
with a misspelled config key (kill and resume: tests/test_checkpoint.py).
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from topk_sparse.configs import common
from tests.devices import mirrored_strategy
from tests.events import read_events
from tests.runs import (CONFIGS, check_vit_run, flags, load_config,
                        run_python, vit_config)
from tests.mock_tfds import mocked_tfds
from topk_sparse import (allocation, checks, distribute, evaluation,
                         optimizers, training, warm_start)
from topk_sparse import workdir as workdir_lib
from topk_sparse.data import corruptions
from topk_sparse.models import T5, ViT

# Strategies.

def test_get_strategy_names_and_batch_check():
    assert distribute.get_strategy("cpu") is tf.distribute.get_strategy()
    with pytest.raises(ValueError, match="Unknown strategy 'gpu'.*'auto'"):
        distribute.get_strategy("gpu")
    mirrored = mirrored_strategy()
    assert distribute.per_replica_batch(64, mirrored) == 32
    with pytest.raises(ValueError, match="63 must be a positive multiple "
                                         "of the 2 replicas.*try 62"):
        distribute.per_replica_batch(63, mirrored)


def test_get_strategy_in_a_fresh_process():
    # Its own process: a second MirroredStrategy here would break the
    # collectives of the shared one, and the CPU split must come first.
    script = textwrap.dedent("""
        import logging
        import tensorflow as tf
        from topk_sparse import distribute
        s = distribute.get_strategy("mirrored", num_cpu_devices=2)
        assert isinstance(s, tf.distribute.MirroredStrategy), s
        assert s.num_replicas_in_sync == 2
        assert distribute.get_strategy("mirrored") is s  # one per process
        try:
            distribute.get_strategy("mirrored", num_cpu_devices=3)
        except RuntimeError as e:
            assert "already runs with 2" in str(e), e
        else:
            raise AssertionError("a late CPU split must fail")
        # No TPU and one CPU device: auto falls back to the default, without
        # TensorFlow's "Initializing the TPU system" line.
        tf.get_logger().setLevel("INFO")
        logged = []
        handler = logging.Handler()
        handler.emit = lambda record: logged.append(record.getMessage())
        tf.get_logger().addHandler(handler)
        assert distribute.get_strategy("auto") is tf.distribute.get_strategy()
        assert not [line for line in logged if "TPU" in line], logged
        assert tf.get_logger().level == logging.INFO
        try:
            distribute.get_strategy("tpu")
        except RuntimeError as e:
            assert "No TPU found for tpu='local'" in str(e), e
        else:
            raise AssertionError("no TPU here")
        print("OK")
    """)
    process = run_python(["-c", script])
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "OK" in output, output


# Training in process.

@pytest.mark.slow
def test_train_runlocal_one_device_jit(tmp_path, capsys):
    config = vit_config("cpu")
    workdir = str(tmp_path / "vit")
    report = training.train(config, workdir)
    assert f"report: {workdir}/report.json" in capsys.readouterr().out
    check_vit_run(workdir, config, report)
    assert report["jit_compile"] is True and report["replicas"] == 1
    assert report["strategy"] == "DefaultDistributionStrategy"


@pytest.mark.slow
def test_train_mirrored_mixed_precision(tmp_path):
    config = load_config("vit_digits", "runlocal")
    config.mixed_precision = "mixed_bfloat16"
    config.model.k = None  # the dense baseline
    config.eval.every_epochs = 0
    report = training.train(config, str(tmp_path), mirrored_strategy())

    assert report["strategy"] == "MirroredStrategy"
    assert report["replicas"] == 2
    # XLA fails on MirroredStrategy over CPU devices: train() turns it off.
    assert report["jit_compile"] is False
    assert np.isfinite(report["eval"]["loss"])
    assert "val_loss" not in report["history"]
    # Dense ReLU: about half the activations are positive at initialization.
    for value in report["nonzero_fraction"].values():
        assert 0.2 < value < 0.8
    # The global policy is back to what it was.
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.slow
def test_train_cifar10_runlocal_on_mocked_tfds(tmp_path):
    data_dir = str(tmp_path / "tfds")
    config = load_config("vit_cifar10", "runlocal")
    config.jit_compile = False
    config.data.data_dir = data_dir
    config.data.label_noise = 0.4
    config.eval.cifar10_corrupted = True
    names = ["cifar10"] + [
        f"cifar10_corrupted/{name}_{severity}"
        for name in corruptions.BENCHMARK_CORRUPTIONS
        for severity in config.eval.severities]
    with mocked_tfds(data_dir, names, num_examples=24):
        report = training.train(config, str(tmp_path / "run"))
    assert report["dataset"] == "cifar10" and report["train_steps"] == 4
    assert report["label_noise"] == 0.4
    assert np.isfinite(report["eval"]["loss"])
    benchmark = report["cifar10_corrupted"]
    assert list(benchmark["corruptions"]) == list(
        corruptions.BENCHMARK_CORRUPTIONS)
    assert set(benchmark["corruptions"]["fog"]) == {"1", "5", "mean"}
    assert "robustness/fog/accuracy" in read_events(
        str(tmp_path / "run" / "tensorboard" / "cifar10_corrupted"))[0]


@pytest.mark.parametrize("name", [
    "vit_digits", "vit_cifar10", "vit_b16_imagenet", "t5_synthetic",
    "t5_small_c4", "t5_base_c4", "t5_wmt"])
def test_configs_build_and_document_themselves(name):
    config, local = load_config(name), load_config(name, "runlocal")
    for key in ("model", "optimizer", "data", "eval"):
        assert key in config
    assert local.epochs * local.steps_per_epoch <= 10
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "python -m trainers." in module.__doc__
    assert "Expected" in module.__doc__ or "Measured" in module.__doc__


def test_non_finite_loss_fails_loudly_with_the_steps():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.ones((4, 2), "float32")
    y = np.array([[0.0], [0.0], [np.nan], [0.0]], "float32")
    with pytest.raises(FloatingPointError,
                       match=r"became nan between optimizer steps 2 "
                             r"\(last finite\) and 3"):
        model.fit(x, y, batch_size=1, verbose=0, shuffle=False,
                  callbacks=[training.FailOnNonFiniteLoss()])


def test_optimizer_schedules():
    config = load_config("vit_digits")
    opt = config.optimizer
    opt.warmup_steps = 10
    cosine = optimizers.learning_rate(opt, total_steps=110)
    lr = opt.learning_rate
    rates = [float(cosine(step)) for step in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(rates, [0, lr / 2, lr, lr / 2, 0], atol=1e-7)
    opt.schedule = "constant"
    constant = optimizers.learning_rate(opt, total_steps=110)
    np.testing.assert_allclose(float(constant(80)), lr, rtol=1e-6)
    assert isinstance(optimizers.make(opt, 110),
                      keras.optimizers.AdamW)
    opt.schedule = "rsqrt"
    rsqrt = optimizers.learning_rate(opt, total_steps=110)
    np.testing.assert_allclose([float(rsqrt(s)) for s in (0, 10, 40)],
                               [lr, lr, lr / 2], rtol=1e-6)
    opt.name = "adafactor"
    assert isinstance(optimizers.make(opt, 110),
                      keras.optimizers.Adafactor)
    opt.name = "lamb"
    with pytest.raises(ValueError, match="Unknown config.optimizer.name"):
        optimizers.make(opt, total_steps=110)


def test_config_arguments():
    full, local = load_config("vit_digits"), load_config("vit_digits",
                                                          "runlocal")
    assert local.epochs < full.epochs and local.steps_per_epoch
    assert load_config("vit_digits", "runlocal=False").epochs == full.epochs
    with pytest.raises(ValueError, match="Unknown config argument 'fast'"):
        load_config("vit_digits", "fast")
    assert local.strategy == "cpu" and local.eval.severities == (1, 5)
    assert full.model.name == "vit" and full.data.name == "digits"


@pytest.mark.parametrize("name", ["vit_digits", "vit_cifar10",
                                  "t5_synthetic", "t5_small_c4"])
def test_model_dimensions_are_config_keys_that_override_the_variant(name):
    config = load_config(name)
    assert all(config.model[key] is None for key in common.DIMENSIONS)
    config.model.update(depth=1, mlp_dim=200, k=8)
    kwargs = dict(config.model)
    del kwargs["name"]
    model = (ViT(**kwargs, image_size=16, num_classes=10)
             if config.model.name == "vit" else T5(**kwargs, vocab_size=50))
    mlps = model.sparse_mlps()
    assert len(mlps) == (1 if config.model.name == "vit" else 2)
    assert {mlp.mlp_dim for mlp in mlps.values()} == {200}


@pytest.mark.slow
def test_auto_k_allocates_on_a_dense_run_then_fine_tunes(tmp_path,
                                                        monkeypatch):
    def config(**changes):
        config = load_config("vit_digits", "runlocal")
        config.eval.every_epochs = 0
        config.eval.corruptions = ()
        config.eval.allocate.update(examples=32, step=16)
        config.update(changes)
        return config

    dense_dir, auto_dir = str(tmp_path / "dense"), str(tmp_path / "auto")
    dense = config()
    dense.model.k = None
    dense.eval.allocate.mean_k = 24  # its evaluation allocates as auto:24
    trained = training.train(dense, dense_dir)
    evaluated = trained["allocation"]
    # A Top-32 run allocates from its own k: auto searches on the dense copy.
    top32_dir = str(tmp_path / "top32")
    training.train(config(), top32_dir)
    searched = config(init_from=top32_dir)
    searched.model.k = "auto:24"
    searched = training.train(searched, str(tmp_path / "searched"))["auto_k"]
    assert "reported_by" not in searched
    assert sum(searched["k"].values()) == 48
    # Without a dense run: it trains one first, as the dense run above.
    warm_dir = str(tmp_path / "warm")
    warm = config(dense_warmup_epochs=dense.epochs)
    warm.model.k = "auto:24"
    warmed = training.train(warm, warm_dir)
    warmup_dir = os.path.join(warm_dir, warm_start.WARMUP)
    assert warmed["init_from"] == warmup_dir
    with open(os.path.join(warmup_dir, "report.json")) as f:
        warmup = json.load(f)
    assert warmup["k"] is None and "allocation" not in warmup
    assert warmup["history"] == trained["history"]
    assert warmed["auto_k"]["k"] == evaluated["k"]
    # From the dense run, the k its evaluation chose, not searched again.
    monkeypatch.setattr(allocation, "allocate", None)
    auto = config(init_from=dense_dir)
    auto.model.k = "auto:24"
    report = training.train(auto, auto_dir)

    allocated = report["auto_k"]
    assert allocated["reported_by"] == dense_dir
    assert allocated["k"] == evaluated["k"]
    assert report["k"] == "auto:24" and report["init_from"] == dense_dir
    assert report["mlp_k"] == allocated["k"]
    assert sum(allocated["k"].values()) == 48 and allocated["mean_k"] == 24
    assert (allocated["examples"], allocated["step"], allocated["by"]) == (
        32, 16, "model")
    # From the same weights with the same k: the same training.
    assert warmed["history"] == report["history"]
    # Started again, the warm-up and the run are found finished.
    again = training.train(warm, warm_dir)
    assert again["epochs_run"] == [] and again["auto_k"] == warmed["auto_k"]
    # Killed after allocating, before its first epoch: the same run.
    shutil.rmtree(os.path.join(warm_dir, "backup"))
    for name in ("report.json", "model.keras"):
        os.remove(os.path.join(warm_dir, name))
    assert training.train(warm, warm_dir)["history"] == warmed["history"]
    with open(os.path.join(auto_dir, "allocation.json")) as f:
        assert json.load(f) == allocated
    assert ViT.from_config(keras.saving.load_model(os.path.join(
        auto_dir, "model.keras")).get_config()).k == allocated["k"]
    # Started again, the finished run evaluates with the k it kept.
    again = training.train(auto, auto_dir)
    assert again["auto_k"] == allocated and again["epochs_run"] == []
    # Other allocation settings are another run.
    other = config(init_from=dense_dir)
    other.model.k = "auto:24"
    other.eval.allocate.examples = 64
    with pytest.raises(checks.ConfigError,
                       match="allocation.json holds k allocated with "
                             "config.eval.allocate .*use another --workdir"):
        training.train(other, auto_dir)


@pytest.mark.parametrize("changes, match", [
    ({"model.k": "auto:16"}, r"config.model.k='auto:16' allocates k on a "
                             r"trained dense model: set config.init_from .*"
                             r"or config.dense_warmup_epochs"),
    ({"dense_warmup_epochs": 2}, r"config.dense_warmup_epochs=2 trains a "
                                 r"dense model .* not for k=32: unset it"),
    ({"model.k": "auto:16", "dense_warmup_epochs": 2, "init_from": "/x"},
     r"config.dense_warmup_epochs=2 and config.init_from='/x' both give"),
    ({"model.k": "auto:16", "dense_warmup_epochs": -1},
     "config.dense_warmup_epochs must be a positive int"),
    ({"model.k": "auto:many", "init_from": "/x"},
     r"config.model.k='auto:many' is not a k: .*auto:<mean k> \(e.g. "
     r"auto:16\)"),
    ({"model.k": "sixteen"}, "config.model.k='sixteen' is not a k"),
    ({"init_from": "/nonexistent/run"}, r"config.init_from='/nonexistent/"
                                         r"run': no /nonexistent/run/model"
                                         r".keras. Give a finished run's"),
])
def test_init_from_and_auto_k_errors_are_one_line(tmp_path, changes, match):
    config = load_config("vit_digits", "runlocal")
    config.update_from_flattened_dict(changes)
    with pytest.raises(checks.ConfigError, match=match):
        training.train(config, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "backup"))


def test_a_workdir_from_before_an_added_key_still_resumes(tmp_path):
    config = load_config("vit_digits", "runlocal")
    older = json.loads(json.dumps(config.to_dict(), default=str))
    for key, added in workdir_lib.ADDED_KEYS.items():
        *sections, name = key.split(".")
        section = older
        for part in sections:
            section = section[part]
        if section.get(name) == added:  # patch_size 4 is this config's own
            del section[name]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(older, f)
    assert workdir_lib.config_fingerprint(older) == \
        workdir_lib.config_fingerprint(config)
    workdir_lib.check(str(tmp_path), config)  # no error
    config.dense_warmup_epochs = 2
    with pytest.raises(checks.ConfigError,
                       match=r"dense_warmup_epochs: '\(not set\)' -> 2"):
        workdir_lib.check(str(tmp_path), config)


@pytest.mark.parametrize("inside", [False, True])
def test_a_workdir_that_is_a_file_is_refused_before_training(tmp_path,
                                                             inside):
    # TensorFlow's makedirs raised FailedPreconditionError, with a traceback.
    path = tmp_path / "notes.txt"
    path.write_text("not a workdir")
    workdir = str(path / "run" if inside else path)
    with pytest.raises(checks.ConfigError) as raised:
        training.train(load_config("vit_digits", "runlocal"), workdir)
    assert str(raised.value) == (
        f"--workdir={workdir}: {path} is a file, not a folder. Use another "
        f"--workdir (a new folder, or a run's workdir to resume).")
    assert path.read_text() == "not a workdir"


def test_init_from_another_architecture_is_refused(tmp_path):
    source = str(tmp_path / "wide.keras")
    ViT("micro", image_size=16, num_classes=10, mlp_dim=64).save(source)
    config = load_config("vit_digits", "runlocal")
    config.init_from = source
    with pytest.raises(checks.ConfigError,
                       match=r"holds a model of another architecture .* give "
                             r"config.model its dimensions"):
        training.train(config, str(tmp_path / "run"))


@pytest.mark.parametrize("model_k, section, changes, match", [
    (None, "two_stage", {"rank": 8}, "needs Top-k MLPs"),
    (32, "two_stage", {"rank": 33}, "rank must be"),
    (32, "two_stage", {"rank": 8, "candidates": 16}, "candidates must be"),
    (32, "two_stage", {"rank": 8, "examples": 0},
     "examples must be a positive int"),
    (None, "allocate", {"mean_k": 129}, r"mean_k must be a number in "
                                        r"\[1, 128\]"),
    (32, "allocate", {"mean_k": 8, "examples": 0},
     "config.eval.allocate.examples must be a positive int"),
    ([8, 16], "allocate", {"mean_k": 8, "step": -1},
     "config.eval.allocate.step must be a positive int")])
def test_evaluation_arguments_fail_before_training(tmp_path, model_k,
                                                   section, changes, match):
    config = load_config("vit_digits", "runlocal")
    config.model.k = model_k
    config.eval[section].update(changes)
    with pytest.raises(ValueError, match=match):
        training.train(config, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "backup"))


# The mock holds 16 documents, fewer chunks than the evaluation split asks
# for: evaluation ends early, as Keras warns.
@pytest.mark.filterwarnings("ignore:Your input ran out of data:UserWarning")
def test_train_t5_c4_runlocal_on_mocked_tfds(tmp_path):
    data_dir = str(tmp_path / "tfds")
    config = load_config("t5_small_c4", "runlocal")
    config.jit_compile = False
    config.data.data_dir = data_dir
    with mocked_tfds(data_dir, ["c4"], num_examples=16):
        report = training.train(config, str(tmp_path / "run"))
    assert report["dataset"] == "c4" and report["train_steps"] == 2 * 2
    assert np.isfinite(report["eval"]["loss"])


def test_exact_match_ignores_what_follows_eos():
    class Echo(keras.Model):
        def generate(self, encoder_tokens, max_length):
            return encoder_tokens[:, :max_length]

    inputs = {"encoder_tokens": tf.constant([[5, 1, 9], [5, 6, 1]])}
    targets = tf.constant([[5, 1, 0], [5, 7, 1]])
    weights = tf.cast(targets > 0, tf.float32)
    dataset = tf.data.Dataset.from_tensors((inputs, targets, weights))
    assert evaluation.exact_match(Echo(), dataset, 2) == 0.5
    # The first num_examples only: the second example (wrong) is not read.
    assert evaluation.exact_match(Echo(), dataset, 1) == 1.0
    assert evaluation.exact_match(Echo(), dataset.repeat(3), 5) == 3 / 5


# The binary.

@pytest.mark.slow
def test_t5_binary_runs_its_default_config_mirrored(tmp_path):
    # On one device, with the evaluations checked: the installed wheel's
    # console script (tests/test_packaging.py).
    process = run_python(["-m", "trainers.t5",
                          "--config=configs/t5_synthetic.py:runlocal",
                          *flags({"strategy": "mirrored",
                                  "num_cpu_devices": 2}),
                          f"--workdir={tmp_path}"])
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    assert "t5 on synthetic, k=64" in output and "exact_match" in output
    assert "MirroredStrategy x2" in output
    with open(os.path.join(tmp_path, "report.json")) as f:
        assert json.load(f)["train_steps"] == 2 * 3


@pytest.mark.slow
def test_default_config_gives_the_same_report_on_a_busy_machine(tmp_path):
    # Hosts of one machine kind differ (their CPUs' float kernels), so the
    # docs quote ranges over seeds; on one host a config's report is bit
    # for bit the same, whatever else the machine runs.
    def report(workdir):
        process = run_python(["-m", "trainers.vit",
                              "--config=configs/vit_digits.py:runlocal",
                              "--config.verbose=0", f"--workdir={workdir}"])
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 0, output
        with open(os.path.join(workdir, "report.json")) as f:
            report = json.load(f)
        del report["train_time_s"], report["wall_time_s"]
        return report

    first = report(tmp_path / "first")
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count())]
    try:
        busy = report(tmp_path / "busy")
    finally:
        for process in load:
            process.kill()
            process.wait()
    assert busy == first


@pytest.mark.parametrize("override,expected", [
    ("--config.model.kk=3", "Unknown config key 'kk' in --config.model.kk"
                            ".*Did you mean \"k\"\\?.*Valid keys of "
                            "config.model: .*method, mlp_dim, name"),
    ("--config.modle.k=3", "Unknown config key 'modle'.*Did you mean "
                           "\"model\"\\?.*Valid keys of config: "),
])
def test_unknown_config_key_lists_the_valid_keys(override, expected):
    process = run_python(["-m", "trainers.vit", override,
                          "--workdir=/nonexistent/never_written"])
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 1, output
    assert "Traceback" not in output, output
    assert re.search(expected, output, re.S), output
