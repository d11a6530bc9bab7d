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


def test_every_benchmark_json_has_a_renderer():
    committed = {name for name in os.listdir(os.path.dirname(TABLES))
                 if name.endswith(".json")}
    assert committed == set(tables.RENDERERS)


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


def _decode_row(batch, mode, case, tokens_per_s, throughput, step, probe):
    return {"variant": "tiny", "batch": batch, "mode": mode, "case": case,
            "tokens_per_s": tokens_per_s, "throughput_ratio": throughput,
            "step_ratio": step, "step_over_probe": probe}


def _decode_result(profile):
    rows = [_decode_row(1, "jit_compile", "dense", 40.0, 1.0, 1.0, 1.0944),
            _decode_row(1, "jit_compile", "top-8 default", 47.6, 1.19, 1.2241,
                        0.894),
            _decode_row(1, "jit_compile", "top-8 allocated", 46.8, 1.17,
                        1.2, 0.912),
            _decode_row(1, "jit_compile", "top-8 two-stage", 54.9, 1.3731,
                        1.438, 0.761),
            _decode_row(16, "jit_compile", "dense", 245.7, 1.0, 1.0, 2.861),
            _decode_row(16, "jit_compile", "top-8 default", 218.2, 0.888,
                        0.93, 3.076),
            _decode_row(16, "jit_compile", "top-8 allocated", 250.1, 1.018,
                        1.02, 2.805)]
    allocated_k = {"encoder_block_0_mlp": 12, "encoder_block_1_mlp": 12,
                   "decoder_block_0_mlp": 1, "decoder_block_1_mlp": 6}
    return {"args": {"k": 8, "source_length": 4, "max_length": 3},
            "probes": [{"variant": "tiny", "weights_mb": 0.25,
                        "two_stage_recall": 0.8106,
                        "allocated_k": allocated_k,
                        "allocated_mean_k": 7.75}],
            "rows": rows, "profile": profile}


DECODE_TABLE = """\
**Decoding** (`T5.generate`, greedy, 4 source tokens, 3 generated, random \
weights): the dense model's tokens/s; per Top-k case \
`throughput_ratio / step_ratio`, its tokens/s over dense's (encoder \
included), then the dense step time over its own (decoding alone); the \
dense step time over the memory probe's, the time to read once the weights \
a step reads (tiny 0.2 MB). Two-stage scoring keeps 0.811 (tiny) of the \
exact top-k on these weights. `allocated` is `default` with one k per MLP, \
their mean at most 8, that `allocation.allocate(by="mlp")` chose for these \
weights (encoder, then decoder MLPs): tiny 12 12 1 6 (mean 7.8).

| variant | batch | mode | dense tokens/s | top-8 default | top-8 allocated \
| top-8 two-stage | dense step/probe |
| --- | --- | --- | --- | --- | --- | --- | --- |
| tiny | 1 | jit_compile | 40.000 | 1.190 / 1.224 | 1.170 / 1.200 \
| 1.373 / 1.438 | 1.094 |
| tiny | 16 | jit_compile | 245.700 | 0.888 / 0.930 | 1.018 / 1.020 | - \
| 2.861 |"""


def test_decode_renderer_without_profile():
    assert tables.decode(_decode_result([])) == DECODE_TABLE


def test_decode_renderer_with_profile():
    profile = [{"variant": "tiny", "mode": "jit_compile", "case": case,
                "part": part, "median_ms": ms}
               for case, parts in (("dense", (12.41, 12.61, 3.57)),
                                   ("top-8 default", (11.9, 7.82, 3.99)))
               for part, ms in zip(("attention", "mlp", "output projection"),
                                   parts)]
    assert tables.decode(_decode_result(profile)) == DECODE_TABLE + """

**Parts of a batch-1 decoding step**, each over all decoder blocks and \
timed apart: median_ms.

| variant | mode | case | attention | mlp | output projection |
| --- | --- | --- | --- | --- | --- |
| tiny | jit_compile | dense | 12.4 | 12.6 | 3.6 |
| tiny | jit_compile | top-8 default | 11.9 | 7.8 | 4.0 |"""


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


def test_command_writes_flags_whose_default_is_not_a_literal(tmp_path):
    # decode.py's `--modes` defaults to `list(MODES)`: unknown without
    # importing the script, so the command spells it out.
    script = tmp_path / "bench.py"
    script.write_text(
        "import argparse\n"
        "MODES = {'tf.function': False, 'jit_compile': True}\n"
        "parser = argparse.ArgumentParser()\n"
        "parser.add_argument('--modes', nargs='+', default=list(MODES))\n"
        "parser.add_argument('--repeats', type=int, default=3)\n")
    args = {"modes": ["tf.function", "jit_compile"], "repeats": 3}
    assert tables.command(str(script), args).endswith(
        "bench.py --modes tf.function jit_compile")
