"""The package as pip installs it, and the README's two commands.

A wheel is what `pip install "topk_sparse @ git+..."` installs: it must
carry the library and the trainers' configs (as `topk_sparse.configs`,
which notebooks import without a checkout).
"""

import importlib.util
import pathlib
import subprocess
import sys
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_carries_library_and_configs(tmp_path):
    # No build isolation: the environment's setuptools, no index needed.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(ROOT)],
        check=True, cwd=tmp_path,
        env={"PIP_NO_INPUT": "1", "PATH": "/usr/bin:/bin"})
    (wheel,) = (tmp_path / "wheel").glob("topk_sparse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in (ROOT / "configs").glob("*.py"):
        assert f"topk_sparse/configs/{config.name}" in names
    assert "topk_sparse/training.py" in names
    assert not any(name.startswith(("configs/", "tests/", "trainers/"))
                   for name in names), sorted(names)


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
