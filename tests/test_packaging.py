"""The package as pip installs it from the repository (Colab's install line).

A wheel is what `pip install "topk_sparse @ git+..."` installs: it must
carry the library and the trainers' configs (as `topk_sparse.configs`,
which notebooks import without a checkout).
"""

import pathlib
import subprocess
import sys
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
