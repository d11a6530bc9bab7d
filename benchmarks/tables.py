"""Markdown tables of the committed benchmark JSON, in benchmarks/README.md.

Each benchmark writes its measurements as JSON beside itself; this script
renders each JSON file into the README region between
`<!-- tables:NAME.json -->` and `<!-- /tables:NAME.json -->`, so that a
measured number lives in the JSON and nowhere else. Every region starts with
what the JSON recorded: the Keras backend and its version, the CPU count,
the arguments, and the command that reproduces them (the script plus the
flags that differ from its defaults, read from its source without importing
TensorFlow). A JSON measured on JAX is `<script>_jax.json`.

A new benchmark adds a render function `(result dict) -> markdown` to
`RENDERERS` and a region to the README.

Usage:
  python benchmarks/tables.py           # rewrite the README's regions
  python benchmarks/tables.py --check   # exit 1 if one is stale
"""

import argparse
import ast
import json
import os
import re
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
BASELINE = "dense relu"  # the case every ratio is measured against
T5_BASELINE = "dense"  # decode.py's


def cell(key, value):
    """The benchmarks' own print format: ms to 0.1, other floats to 0.001,
    None as "-"."""
    if value is None:
        return "-"
    if key.endswith("_ms"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown(header, rows):
    """A Markdown table of `header` and `rows` (lists of strings)."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def records(rows, keys, header=None):
    """A Markdown table of `keys` of each row (a dict)."""
    return markdown(header or keys,
                    [[cell(k, row[k]) for k in keys] for row in rows])


def grouped(rows, index, column):
    """Rows grouped by their `index` keys, first seen first:
    `[(index values, {row[column]: row})]`."""
    groups = {}
    for row in rows:
        key = tuple(row[k] for k in index)
        groups.setdefault(key, {})[row[column]] = row
    return list(groups.items())


def unique(values):
    return list(dict.fromkeys(values))


# Renderers: the result dict of one benchmark JSON -> Markdown.

def topk_mlp(result):
    args = result["args"]
    training = records(result["training"],
                       ["mode", "case", "min_ms", "median_ms", "ratio"])
    # Inference: one row per batch and mode, one ratio column per case.
    cases = [case for case in unique(r["case"] for r in result["inference"])
             if case != BASELINE]
    rows = []
    for (batch, mode), by_case in grouped(result["inference"],
                                          ["batch", "mode"], "case"):
        ratios = [by_case[c]["ratio"] if c in by_case else None
                  for c in cases]
        rows.append([str(batch), mode,
                     cell("median_ms", by_case[BASELINE]["median_ms"]),
                     *(cell("ratio", r) for r in ratios)])
    return (f"**Training step** (forward+backward, {args['tokens']} tokens): "
            f"time / dense time.\n\n{training}\n\n"
            f"**Inference** (forward through {args['layers']} residual MLP "
            "blocks, tokens per call = batch): the dense call's median_ms and "
            "each case's time / dense time.\n\n"
            + markdown(["batch", "mode", "dense median_ms", *cases], rows))


def recall(result):
    rows = result["rows"]
    # With as many bins as entries, "approx" is the exact top_k.
    approx = [r for r in rows
              if r["method"] == "approx" and r["bins"] < r["n"]]
    statistical = [r for r in rows if r["method"] == "statistical"]
    # Two-stage: one row per source and k, one column per rank and
    # candidates, "recall / cosine" in each.
    two_stage = [{**r, "setting": (r["rank"], r["candidates"])}
                 for r in result["two_stage"]]
    settings = unique(r["setting"] for r in two_stage)
    scored = []
    for (source, d, k), by_setting in grouped(two_stage, ["source", "d", "k"],
                                              "setting"):
        cells = [f"{by_setting[s]['recall']:.3f} / "
                 f"{by_setting[s]['cosine']:.3f}" if s in by_setting else "-"
                 for s in settings]
        scored.append([source, str(d), str(k), *cells])
    return (
        "**approx**, recall of the exact top-k against `ops.expected_recall` "
        "(rows with as many bins as entries are the exact top_k, recall 1, "
        "and left out):\n\n"
        + records(approx, ["source", "n", "k", "recall_target", "bins",
                           "expected_recall", "recall"],
                  ["rows", "mlp_dim", "k", "recall_target", "bins",
                   "expected", "measured"])
        + "\n\n**statistical**, entries kept per row and recall of the exact "
          "top-k:\n\n"
        + records(statistical, ["source", "n", "k", "kept_per_row", "recall"],
                  ["rows", "mlp_dim", "k", "kept_per_row", "recall"])
        + "\n\n**Two-stage scoring**, on held-out tokens: recall of the exact "
          "top-k / cosine of the MLP output to the exact path's, per first-"
          "stage rank and candidates rescored:\n\n"
        + markdown(["rows", "width", "k",
                    *(f"rank {r}, {c} candidates" for r, c in settings)],
                   scored))


def vit_train(result):
    args = result["args"]
    return (f"ViT-{args['variant']} at {args['image_size']} px, batch "
            f"{args['batch']}, `train_on_batch`: images/s and dense time / "
            "time.\n\n"
            + records(result["rows"], ["mode", "case", "median_ms",
                                       "images_per_s", "throughput_ratio"]))


def decode(result):
    args = result["args"]
    # One row per variant, batch and mode; one column per Top-k case with
    # "throughput_ratio / step_ratio" in each (both > 1: faster than dense).
    cases = [case for case in unique(r["case"] for r in result["rows"])
             if case != T5_BASELINE]
    rows = []
    for (variant, batch, mode), by_case in grouped(
            result["rows"], ["variant", "batch", "mode"], "case"):
        ratios = [f"{cell('throughput_ratio', by_case[c]['throughput_ratio'])}"
                  f" / {cell('step_ratio', by_case[c]['step_ratio'])}"
                  if c in by_case else "-" for c in cases]
        dense = by_case[T5_BASELINE]
        rows.append([variant, str(batch), mode,
                     cell("tokens_per_s", dense["tokens_per_s"]), *ratios,
                     cell("step_over_probe", dense["step_over_probe"])])
    weights = ", ".join(f"{p['variant']} {p['weights_mb']:.1f} MB"
                        for p in result["probes"])
    recalls = ", ".join(f"{cell('two_stage_recall', p['two_stage_recall'])} "
                        f"({p['variant']})" for p in result["probes"])
    # A JSON from before decode.py's `allocated` case has no allocated_k.
    allocated = "; ".join(
        f"{p['variant']} {' '.join(map(str, p['allocated_k'].values()))} "
        f"(mean {p['allocated_mean_k']:.1f})" for p in result["probes"]
        if "allocated_k" in p)
    if allocated:
        allocated = (
            " `allocated` is `default` with one k per MLP, their mean at "
            f"most {args['k']}, that `allocation.allocate(by=\"mlp\")` "
            f"chose for these weights (encoder, then decoder MLPs): "
            f"{allocated}.")
    text = (f"**Decoding** (`T5.generate`, greedy, {args['source_length']} "
            f"source tokens, {args['max_length']} generated, random "
            "weights): the dense model's tokens/s; per Top-k case "
            "`throughput_ratio / step_ratio`, its tokens/s over dense's "
            "(encoder included), then the dense step time over its own "
            "(decoding alone); the dense step time over the memory probe's, "
            f"the time to read once the weights a step reads ({weights}). "
            f"Two-stage scoring keeps {recalls} of the exact top-k on these "
            f"weights.{allocated}\n\n"
            + markdown(["variant", "batch", "mode", "dense tokens/s", *cases,
                        "dense step/probe"], rows))
    # The profile is there only with --profile (an empty list without).
    if not result.get("profile"):
        return text
    parts = unique(r["part"] for r in result["profile"])
    steps = [[variant, mode, case,
              *(cell("median_ms", by_part[p]["median_ms"]) if p in by_part
                else "-" for p in parts)]
             for (variant, mode, case), by_part in grouped(
                 result["profile"], ["variant", "mode", "case"], "part")]
    return (text + "\n\n**Parts of a batch-1 decoding step**, each over all "
            "decoder blocks and timed apart: median_ms.\n\n"
            + markdown(["variant", "mode", "case", *parts], steps))


RENDERERS = {
    "topk_mlp.json": topk_mlp,
    "topk_mlp_jax.json": topk_mlp,
    "recall.json": recall,
    "vit_train.json": vit_train,
    "decode.json": decode,
    "decode_jax.json": decode,
}

# The backends' names as the provenance line gives them; a JSON recorded
# on JAX is `<script>_jax.json` (benchmarks/backends.py).
BACKENDS = {"tensorflow": "TensorFlow", "jax": "JAX"}


# A default that is an expression (decode.py's `list(MODES)`) is unknown
# without importing the script: `command` always writes its flag.
NOT_A_LITERAL = object()


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return NOT_A_LITERAL


def script_defaults(script):
    """`{dest: default}` of the `add_argument` calls in `script`'s source;
    `NOT_A_LITERAL` where the default is not a Python literal."""
    with open(script) as f:
        tree = ast.parse(f.read())
    defaults = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "add_argument"):
            continue
        keywords = {k.arg: _literal(k.value) for k in node.keywords
                    if k.arg in ("default", "action")}
        flag_only = keywords.get("action") == "store_true"
        default = keywords.get("default", False if flag_only else None)
        if isinstance(default, tuple):
            default = list(default)
        flag = ast.literal_eval(node.args[0])
        defaults[flag.lstrip("-").replace("-", "_")] = default
    return defaults


def command(script, args):
    """The command line that runs `script` with the recorded `args`: the
    flags that differ from the script's defaults, and those whose default
    is not a literal. Recorded args that the script no longer has (renamed
    flags) are left out."""
    defaults = script_defaults(script)
    words = ["python", os.path.relpath(script, os.path.dirname(HERE))]
    for key, value in args.items():
        if key == "json" or key not in defaults or value == defaults[key]:
            continue
        if value is True:
            words.append(f"--{key}")
        elif isinstance(value, list):
            words += [f"--{key}", *map(str, value)]
        else:
            words.append(f"--{key}={value}")
    return " ".join(map(shlex.quote, words))


def provenance(name, result):
    """What `name` recorded besides its rows, and the command behind it."""
    def text(value):
        if isinstance(value, list):
            return "[" + ", ".join(map(str, value)) + "]"
        return str(value)

    machine = (f"{result['cpu_count']} CPU cores" if "cpu_count" in result
               else "CPU count not recorded")
    if result.get("cpu"):
        machine += f" ({result['cpu']})"
    args = ", ".join(f"{k}={text(v)}" for k, v in result["args"].items()
                     if k != "json")
    backend = result.get("backend", "tensorflow")
    stem = name.removesuffix(".json").removesuffix(f"_{backend}")
    script = os.path.join(HERE, stem + ".py")
    prefix = "" if backend == "tensorflow" else f"KERAS_BACKEND={backend} "
    return (f"Recorded in `benchmarks/{name}` by "
            f"`{prefix}{command(script, result['args'])}`: "
            f"{BACKENDS[backend]} {result[backend]}, {machine}; args {args}.")


def render(name):
    with open(os.path.join(HERE, name)) as f:
        result = json.load(f)
    return f"{provenance(name, result)}\n\n{RENDERERS[name](result)}"


def _region(name):
    return re.compile(rf"(<!-- tables:{re.escape(name)} -->\n)(.*?)"
                      rf"(<!-- /tables:{re.escape(name)} -->)", re.S)


def update(text, rendered):
    """`text` with each region replaced by `rendered[name]`, and the names
    of the regions that changed. Raises ValueError for a missing region or
    one without a renderer."""
    unknown = set(re.findall(r"<!-- tables:(\S+) -->", text)) - set(rendered)
    if unknown:
        raise ValueError(f"regions without a renderer in RENDERERS: "
                         f"{', '.join(sorted(unknown))}")
    stale = []
    for name, body in rendered.items():
        match = _region(name).search(text)
        if match is None:
            raise ValueError(f"no region <!-- tables:{name} --> ... "
                             f"<!-- /tables:{name} --> to write {name} into")
        if match.group(2) != body + "\n":
            stale.append(name)
            text = (text[:match.start(2)] + body + "\n"
                    + text[match.end(2):])
    return text, stale


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1, changing nothing, if a region is stale")
    args = parser.parse_args(argv)
    readme = os.path.relpath(README)
    with open(README) as f:
        text = f.read()
    try:
        text, stale = update(text, {name: render(name) for name in RENDERERS})
    except ValueError as e:
        sys.exit(f"{readme}: {e}")
    if args.check:
        if stale:
            sys.exit(f"{readme}: stale tables in region(s) "
                     + ", ".join(f"<!-- tables:{n} -->" for n in stale)
                     + ": run python benchmarks/tables.py")
        return
    if stale:
        with open(README, "w") as f:
            f.write(text)
    print(f"{readme}: " + (f"rewrote {', '.join(stale)}" if stale
                           else "up to date"))


if __name__ == "__main__":
    main()
