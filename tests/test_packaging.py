"""The package as pip installs it, and the README's two commands; and
`import topk_sparse` on JAX without TensorFlow.

A wheel is what `pip install "topk_sparse @ git+..."` installs: it must
carry the library, the trainers' configs (as `topk_sparse.configs`, which
notebooks import without a checkout) and the training binaries (as
`topk_sparse.trainers`, with console scripts).
"""

import importlib.util
import json
import os
import pathlib
import site
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of this checkout."""
    folder = tmp_path_factory.mktemp("wheel")
    # No build isolation: the environment's setuptools, no index needed.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "--no-build-isolation", "-w", str(folder), str(ROOT)],
        check=True, cwd=folder,
        env={"PIP_NO_INPUT": "1", "PATH": "/usr/bin:/bin"})
    (path,) = folder.glob("topk_sparse-*.whl")
    return path


def test_wheel_carries_library_configs_and_trainers(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("configs", "trainers"):
        for module in (ROOT / folder).glob("*.py"):
            assert f"topk_sparse/{folder}/{module.name}" in names
    assert "topk_sparse/training.py" in names
    assert not any(name.startswith(("configs/", "tests/", "trainers/"))
                   for name in names), sorted(names)


@pytest.mark.slow
def test_an_installed_wheel_runs_the_binaries(wheel, tmp_path):
    """In a fresh venv holding the wheel (its dependencies are this
    environment's, seen through a path file, not its editable install),
    outside a checkout: the console scripts and `python -m` train (the
    runlocal T5 with every evaluation, checked as tests/runs.py checks
    it), and `--config=configs/<file>` names the package's config."""
    from tests.runs import T5_EVALUATIONS, check_t5_run, flags, t5_config

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (purelib,) = venv.glob("lib/python*/site-packages")
    (purelib / "dependencies.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install",
                    "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": ""}
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import topk_sparse.trainers as t; print(t.__file__)"],
        check=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(purelib)), where.stdout
    workdir = tmp_path / "t5"
    trained = subprocess.run(
        [str(venv / "bin" / "topk-sparse-t5"),
         "--config=configs/t5_synthetic.py:runlocal", *flags(T5_EVALUATIONS),
         f"--workdir={workdir}"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert trained.returncode == 0, trained.stdout
    assert "DefaultDistributionStrategy x1" in trained.stdout
    assert "k allocated per MLP at mean k 48" in trained.stdout
    with open(workdir / "report.json") as f:
        check_t5_run(str(workdir), t5_config("cpu"), json.load(f))
    refused = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "topk_sparse.trainers.vit",
         "--config=configs/vit_digits.py:runlocal", "--config.model.kk=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    assert "Unknown config key 'kk'" in refused.stderr, refused.stderr


def readme_commands():
    spec = importlib.util.spec_from_file_location(
        "readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.commands()


def test_readme_starts_with_the_main_job_then_the_tests():
    main_job, tests = readme_commands()
    install = 'python3 -m venv .venv && .venv/bin/pip install -e ".[cpu,test]"'
    assert main_job == f"{install} && .venv/bin/python -m trainers.vit"
    assert tests.startswith(f"{install} && .venv/bin/python -m pytest "), tests
    assert tests.split("&&")[2].split()[-1] == "tests"


def test_readme_is_a_five_minute_read():
    """Details live in CONTRIBUTING.md, benchmarks/ and results/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_ci_runs_the_readme_commands_in_order():
    ci = (ROOT / ".ci" / "run").read_text()
    first = ci.index('bash -c "$main_job"')
    assert ci.index('main_job=$(python3 .ci/readme_commands.py 1)') < first
    assert ci.index('tests=$(python3 .ci/readme_commands.py 2)') < first
    assert first < ci.index('bash -c "$tests"')


def test_every_pip_builds_the_same_editable_install():
    # pip falls back to `setup.py develop`, which drops the configs/
    # mapping, when a project declares no build system and `wheel` is
    # installed (as after the README's first command).
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert build["build-system"]["build-backend"] == "setuptools.build_meta"
    assert build["build-system"]["requires"] == ["setuptools>=64"]


_WITHOUT_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None  # `import tensorflow` raises, as uninstalled
import keras, numpy as np, pytest, topk_sparse
assert keras.config.backend() == "jax"
vit = topk_sparse.models.ViT("micro", image_size=16, num_classes=4, k=8)
vit.compile("adam", keras.losses.SparseCategoricalCrossentropy(
    from_logits=True))
x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype("float32")
history = vit.fit(x, np.arange(8) % 4, batch_size=4, epochs=1, verbose=0)
assert 0 < history.history["encoder_block_0_mlp/nonzero_fraction"][0] <= 1
t5 = topk_sparse.models.T5("tiny", vocab_size=20, k=16)
topk_sparse.scoring.calibrate(vit, [x], rank=8, candidates=16)
assert t5.generate(np.ones((2, 4), "int32"), 3).shape == (2, 3)
vit.save(sys.argv[1])
keras.saving.load_model(sys.argv[1])
with pytest.raises(ImportError, match="SparsityCallback needs TensorFlow"):
    topk_sparse.SparsityCallback
import trainers  # their data and TensorBoard logs need TensorFlow
with pytest.raises(SystemExit, match="install TensorFlow beside JAX"):
    trainers.import_tensorflow()
"""


def test_jax_alone_runs_layers_models_fit_generate_and_saving(tmp_path):
    """`import topk_sparse` on JAX where TensorFlow cannot be imported: the
    models train, decode, save and load; what needs TensorFlow says so."""
    subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW,
                    str(tmp_path / "vit.keras")], check=True, timeout=300,
                   cwd=ROOT, env={**os.environ, "KERAS_BACKEND": "jax"})


def test_modules_that_import_tensorflow_load_on_first_use():
    """`topk_sparse.callbacks.TensorBoard` and the like work right after
    `import topk_sparse`, which imported none of them."""
    subprocess.run([sys.executable, "-c", (
        "import sys, topk_sparse\n"
        "assert 'topk_sparse.callbacks' not in sys.modules\n"
        "topk_sparse.callbacks.TensorBoard, topk_sparse.data.text.EOS_ID\n"
        "topk_sparse.training.train, topk_sparse.distribute.get_strategy\n"
        "assert topk_sparse.SparsityCallback is "
        "topk_sparse.callbacks.SparsityCallback")],
        check=True, timeout=120, env={**os.environ, "KERAS_BACKEND":
                                      "tensorflow"})
