"""benchmarks/README.md's tables are what the committed JSON renders."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = os.path.join(ROOT, "benchmarks", "tables.py")

# benchmarks/ is a folder of scripts, not a package.
_spec = importlib.util.spec_from_file_location("tables", TABLES)
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


def test_readme_tables_match_committed_json():
    result = subprocess.run([sys.executable, TABLES, "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_check_names_the_stale_region(tmp_path, monkeypatch, capsys):
    with open(tables.README) as f:
        text = f.read()
    stale = text.replace("<!-- /tables:vit_train.json -->",
                         "| an edited row |\n<!-- /tables:vit_train.json -->")
    readme = tmp_path / "README.md"
    readme.write_text(stale)
    monkeypatch.setattr(tables, "README", str(readme))
    with pytest.raises(SystemExit) as exit_:
        tables.main(["--check"])
    message = str(exit_.value.code)
    assert "<!-- tables:vit_train.json -->" in message
    assert "topk_mlp.json" not in message and "\n" not in message
    assert readme.read_text() == stale  # --check changes nothing

    tables.main([])
    assert readme.read_text() == text
    assert "rewrote vit_train.json" in capsys.readouterr().out


def test_missing_region_fails():
    with pytest.raises(ValueError, match="no region <!-- tables:new.json"):
        tables.update("no regions here\n", {"new.json": "| table |"})


def test_topk_mlp_renderer():
    training = [{"mode": "tf.function", "case": "dense relu", "min_ms": 9.96,
                 "median_ms": 10.04, "ratio": 1.0},
                {"mode": "tf.function", "case": "top-4 exact", "min_ms": 11.0,
                 "median_ms": 12.0, "ratio": 1.19522}]
    inference = [
        {"batch": 1, "mode": "jit_compile", "case": "dense relu",
         "min_ms": 1.0, "median_ms": 2.0, "ratio": 1.0},
        {"batch": 1, "mode": "jit_compile", "case": "top-4 gather",
         "min_ms": 0.5, "median_ms": 1.0, "ratio": 0.5},
        {"batch": 8, "mode": "jit_compile", "case": "dense relu",
         "min_ms": 3.0, "median_ms": 4.0, "ratio": 1.0},
        {"batch": 8, "mode": "jit_compile", "case": "top-4 two-stage",
         "min_ms": 5.0, "median_ms": 6.0, "ratio": 1.5}]
    result = {"args": {"tokens": 32, "layers": 2}, "training": training,
              "inference": inference}
    assert tables.topk_mlp(result) == """\
**Training step** (forward+backward, 32 tokens): time / dense time.

| mode | case | min_ms | median_ms | ratio |
| --- | --- | --- | --- | --- |
| tf.function | dense relu | 10.0 | 10.0 | 1.000 |
| tf.function | top-4 exact | 11.0 | 12.0 | 1.195 |

**Inference** (forward through 2 residual MLP blocks, tokens per call = \
batch): the dense call's median_ms and each case's time / dense time.

| batch | mode | dense median_ms | top-4 gather | top-4 two-stage |
| --- | --- | --- | --- | --- |
| 1 | jit_compile | 2.0 | 0.500 | - |
| 8 | jit_compile | 4.0 | - | 1.500 |"""


def test_command_lists_only_flags_off_their_defaults(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        "parser.add_argument('--width', type=int, default=768)\n"
        "parser.add_argument('--ks', type=int, nargs='+', default=[32, 64])\n"
        "parser.add_argument('--variant', default='Ti/16')\n"
        "parser.add_argument('--json', default='bench.json')\n")
    args = {"width": 768, "ks": [8, 16], "variant": "B/16",
            "json": "/tmp/b.json", "d": 3}  # "d": a flag since renamed
    assert tables.command(str(script), args).endswith(
        "bench.py --ks 8 16 --variant=B/16")
