"""Top-k MLP vs dense ReLU MLP, measured side by side in one run.

Prints two tables and writes them as JSON:
- training: forward+backward of one MLP block, Top-k (each method) over the
  dense ReLU MLP, in each mode of the backend (`benchmarks/backends.py`:
  tf.function and jit_compile=True on TensorFlow, jax.jit on JAX);
- inference: forward through a stack of `--layers` residual MLP blocks
  (each its own weights, as in a model, so that they are read from memory,
  not from the cache) of the masked path, the gathered path
  (`implementation="gather"`) and the gathered path with two-stage scoring
  (`scoring.calibrate_mlp`, calibrated on random inputs: its speed
  here, its recall in benchmarks/recall.py) over the dense MLP, at several
  batch sizes (tokens per call). Where the gathered path stops paying is
  `implementation="auto"`'s switch point,
  `topk_sparse.layers.GATHER_MAX_SHARE`; two-stage scoring runs while
  tokens x candidates is within the same share (else that row is the plain
  gathered path).

Cases are interleaved repeat by repeat, so a slow moment of this shared
machine hits them all alike; ratios use medians. Sparsity tracking is off in
every case: this measures the Top-k and gather costs alone.

Usage:
  python benchmarks/topk_mlp.py                      # width 768, mlp_dim 3072, k=64
  python benchmarks/topk_mlp.py --k=32 --width=512 --mlp_dim=2048
  KERAS_BACKEND=jax python benchmarks/topk_mlp.py    # -> topk_mlp_jax.json
"""

import argparse
import json
import time

import keras
import numpy as np

import backends
from topk_sparse import SparseMLP, scoring


def _mlp(args, **kwargs):
    layer = SparseMLP(args.mlp_dim, track_sparsity=False, **kwargs)
    layer.build((None, args.width))
    return layer


def normal(shape, seed):
    """Standard normal inputs, the same on every backend."""
    return keras.ops.convert_to_tensor(np.random.default_rng(
        seed).standard_normal(shape).astype("float32"))


def measure(cases, repeats):
    """Times each case (a function) over `repeats` interleaved rounds, after
    one call to trace and compile it; returns `{name: [seconds]}`.

    Each round starts one case later, so that no case always runs first
    (after the others have pushed its weights out of the cache)."""
    for fn in cases.values():
        keras.tree.map_structure(np.asarray, fn())
    times = {name: [] for name in cases}
    names = list(cases)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn = cases[name]
            start = time.perf_counter()
            keras.tree.map_structure(np.asarray, fn())
            times[name].append(time.perf_counter() - start)
    return times


def _rows(times, baseline):
    base = np.median(times[baseline])
    return [{"case": name, "min_ms": 1e3 * min(t),
             "median_ms": 1e3 * float(np.median(t)),
             "ratio": float(np.median(t) / base)}
            for name, t in times.items()]


def training_table(args):
    x = normal([args.tokens, args.width], 0)
    dense = _mlp(args, k=None)
    rows = []
    for mode in backends.MODES:
        cases = {"dense relu": backends.gradient_step(dense, x, mode)}
        for method in args.methods:
            layer = _mlp(args, k=args.k, method=method)
            layer.set_weights(dense.get_weights())
            cases[f"top-{args.k} {method}"] = backends.gradient_step(
                layer, x, mode)
        rows += [{"mode": mode, **row} for row in
                 _rows(measure(cases, args.repeats), "dense relu")]
    return rows


def _stack(layers, x, mode):
    """One call through `layers` as residual blocks, like a model's MLPs:
    the per-call overhead is shared, and `layers` kernels too large for the
    cache are read from memory as in a real model."""
    def forward():
        y = x
        for layer in layers:
            y = y + layer(y, training=False)
        return y
    return backends.compiled(forward, layers, mode)


def inference_table(args):
    def mlps(**kwargs):
        return [_mlp(args, **kwargs) for _ in range(args.layers)]

    dense = mlps(k=None)
    paths = {"masked": mlps(k=args.k, implementation="masked"),
             "gather": mlps(k=args.k, implementation="gather"),
             "two-stage": mlps(k=args.k, implementation="gather")}
    calibration = normal([4 * args.rank, args.width], 2)
    for i, reference in enumerate(dense):
        for layers in paths.values():
            layers[i].set_weights(reference.get_weights())
        scoring.calibrate_mlp(paths["two-stage"][i], calibration, args.rank,
                              args.candidates)
    rows = []
    for batch in args.batches:
        x = normal([batch, args.width], 100 + batch)
        for mode in backends.MODES:
            cases = {"dense relu": _stack(dense, x, mode)}
            for path, layers in paths.items():
                cases[f"top-{args.k} {path}"] = _stack(layers, x, mode)
            # Calls of few tokens take a few milliseconds: more repeats.
            repeats = args.repeats * max(1, 16 // batch)
            rows += [{"batch": batch, "mode": mode, **row} for row in
                     _rows(measure(cases, repeats), "dense relu")]
    return rows


def print_table(title, rows, keys):
    """`rows` (dicts) as a Markdown table of `keys`; ms to 0.1, floats to
    0.001, None as "-"."""
    print(f"\n{title}")
    print(" | ".join(keys))
    print(" | ".join("---" for _ in keys))
    for row in rows:
        print(" | ".join(
            "-" if row[k] is None else
            f"{row[k]:.1f}" if k.endswith("_ms") else
            f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])
            for k in keys))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--mlp_dim", type=int, default=3072)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048,
                        help="tokens per training step")
    parser.add_argument("--batches", type=int, nargs="+",
                        default=[1, 2, 4, 8, 16, 128])
    parser.add_argument("--layers", type=int, default=12,
                        help="MLPs per inference call (a Base model's 12)")
    parser.add_argument("--rank", type=int, default=64,
                        help="two-stage scoring: rank of the first stage")
    parser.add_argument("--candidates", type=int, default=256,
                        help="two-stage scoring: neurons rescored per token")
    parser.add_argument("--methods", nargs="+",
                        default=["exact", "approx", "statistical"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=backends.json_path("topk_mlp"))
    args = parser.parse_args()

    result = {"args": vars(args), **backends.record()}
    result["training"] = training_table(args)
    columns = ["min_ms", "median_ms", "ratio"]
    print_table(f"Training step (fwd+bwd), {args.tokens} tokens, "
                f"width={args.width}, mlp_dim={args.mlp_dim}: time / dense",
                result["training"], ["mode", "case", *columns])
    result["inference"] = inference_table(args)
    print_table(f"Inference (forward through {args.layers} MLPs): time / "
                "dense", result["inference"],
                ["batch", "mode", "case", *columns])
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
