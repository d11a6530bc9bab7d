"""T5 decoding with the key/value cache: Top-k over dense, side by side.

Tokens per second of `T5.generate` (greedy, `--source_length` source tokens,
`--max_length` generated, random weights) for the dense T5 and the same
weights with Top-k MLPs: `masked` (`implementation="masked"`: every MLP
multiplies both kernels densely), `default` (`implementation="auto"`: the
decoder's MLPs, which see one token per sequence per step, take the
gathered path while batch x k is at most a sixth of mlp_dim) and
`allocated` (`default` with one k per MLP, their mean at most `--k`:
`allocation.allocate` on the dense model) and `two-stage` (`default` after
`scoring.calibrate` at `--rank` / `--candidates`: its first stage reads a
low-rank factorization of W1, and runs while batch x candidates is at most
a sixth of mlp_dim, else that row is the plain gathered path). Each model
is timed in each mode of the backend (tf.function and jit_compile=True on
TensorFlow, jax.jit on JAX: `benchmarks/backends.py`), at each batch size.

Each case also times its encoder alone, so that a decoding step's time is
`(generate - encode) / max_length`. It is compared with a memory probe, the
time to read once every weight a decoding step reads (the decoder's but its
cross-attention keys and values, computed once per sequence, and the tied
embedding as output projection): the fastest of the modes' reductions over
them. The cases of a batch and mode, the probes
included, are interleaved repeat by repeat (see topk_mlp.measure), so that
a busy moment of this shared machine hits them all alike; ratios use
medians: `throughput_ratio` is tokens/s over the dense model's tokens/s
(>1: faster; the encoder included), `step_ratio` the dense model's step
time over the case's (decoding alone), `step_over_probe` the step time over
the probe time (1: the memory-bound limit).

`--profile` adds, at batch 1, the time of the parts of one decoding step
timed apart (all blocks' self- and cross-attention with their norms, all
MLPs with their norms, the output projection), to see where a step goes.

Two-stage scoring is calibrated, and k allocated, on the same
`--calibration_batches` batches of random source and target tokens. On
random weights two-stage scoring keeps only part of the exact top-k
(`two_stage_recall` in the JSON), so its rows show speed, not quality (see
benchmarks/recall.py); and the allocation is the library's choice for
these weights (`allocated_k` in the JSON), not a trained model's. Its
speed depends only on the k per MLP: `auto` gathers an MLP's second
projection while its tokens x its own k is at most a sixth of mlp_dim, so
with k spread unevenly, an MLP given more than `--k` leaves the gathered
path at a smaller batch than uniform k does (and one given less stays on
it longer): that is what `allocated` beside `default` shows.

Usage:
  python benchmarks/decode.py              # small and base, batch 1, 4, 16
  python benchmarks/decode.py --variants base --batches 1 --profile
  python benchmarks/decode.py --variants tiny --vocab_size 64 --k 8 \\
      --rank 8 --candidates 16 --batches 1 --repeats 1   # seconds
  KERAS_BACKEND=jax python benchmarks/decode.py   # -> decode_jax.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np

import backends
from backends import MODES
from topk_mlp import measure, normal, print_table
from topk_sparse import allocation, scoring
from topk_sparse.models import T5, T5_VARIANTS


def _calibration_batches(args):
    """`--calibration_batches` batches of 4 x source_length random tokens,
    what two-stage scoring is calibrated and k allocated on."""
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(args.calibration_batches):
        tokens = rng.integers(1, args.vocab_size,
                              size=(4, args.source_length)).astype("int32")
        batches.append({"encoder_tokens": tokens, "decoder_tokens": tokens})
    return batches


def _models(args, variant, batches):
    """`{case: T5}`, every Top-k model with the dense model's weights, and
    the `allocation.Allocation` of the `allocated` case."""
    def t5(**kwargs):
        return T5(variant, vocab_size=args.vocab_size, dropout_rate=0.0,
                  **kwargs)

    keras.utils.set_random_seed(0)
    models = {"dense": t5()}
    # by="mlp" lowers the k whose MLP's own output loses least: after one
    # measuring pass over `batches` it needs no model pass, where
    # by="model" runs the model eagerly on them once per MLP and greedy
    # step (T5-Base: 24 MLPs, hundreds of steps).
    allocated = allocation.allocate(models["dense"], batches, args.k,
                                    by="mlp")
    topk = f"top-{args.k}"
    models[f"{topk} masked"] = t5(k=args.k, implementation="masked")
    models[f"{topk} default"] = t5(k=args.k)
    models[f"{topk} allocated"] = t5(k=allocated.k)
    models[f"{topk} two-stage"] = t5(k=args.k)
    weights = models["dense"].get_weights()
    for name, model in models.items():
        if name != "dense":
            model.set_weights(weights)
    return models, allocated


def _calibrate(args, model, batches):
    """Two-stage scoring calibrated on `batches`; returns the mean recall
    over the MLPs."""
    measured = scoring.calibrate(model, batches, args.rank, args.candidates)
    return float(np.mean([m["recall"] for m in measured.values()]))


def step_weights(model):
    """The weights one decoding step reads: the decoder blocks' but the
    cross-attention keys and values (computed once per sequence), the
    decoder's final norm and the tied embedding (the output projection)."""
    weights = [model.token_embedding.embedding,
               *model.decoder_norm.weights]
    for block in model.decoder_blocks:
        cross = block.cross_attention_layer
        skip = {id(w) for w in (*cross.key_dense.weights,
                                *cross.value_dense.weights)}
        weights += [w for w in block.weights if id(w) not in skip]
    return [w for w in weights if w.trainable]


def memory_probes(model):
    """`{"probe <mode>": fn}` per mode: each reads `step_weights(model)`
    once (a sum of each)."""
    weights = step_weights(model)

    def read():
        return sum(keras.ops.sum(w) for w in weights)

    return {f"probe {mode}": backends.compiled(read, [model], mode)
            for mode in MODES}


def _generate(model, tokens, args, mode):
    return backends.compiled(
        lambda: model.generate(tokens, args.max_length), [model], mode)


def _encode(model, tokens, mode):
    return backends.compiled(
        lambda: model._encode(tokens, training=False), [model], mode)


def _step_parts(model, batch, args, mode):
    """`{part: fn}`: the parts of one decoding step at position
    `max_length - 1`, each over every decoder block, on random states."""
    blocks = model.decoder_blocks
    width, length = model.width, args.max_length
    x = normal([batch, 1, width], 3)
    heads = [batch, model.num_heads, length, width // model.num_heads]
    cache = normal(heads, 4)
    context = normal([batch, model.num_heads, args.source_length, heads[-1]],
                     5)
    bias = model.decoder_position_bias.bias_at(length - 1, length)
    written = keras.ops.ones([length], "bool")
    project = model._output_projection(batch)

    def attention():
        y = x
        for block in blocks:
            normed = block.attention_norm(y)
            keys, values = block.attention.keys_and_values(normed)
            keys = keras.ops.concatenate([cache[:, :, :-1], keys], 2)
            values = keras.ops.concatenate([cache[:, :, :-1], values], 2)
            y = y + block.attention.attend(normed, keys, values, bias,
                                           written[None, None, None])
            y = y + block.cross_attention_layer.attend(
                block.cross_attention_norm(y), context, context)
        return y

    def mlp():
        y = x
        for block in blocks:
            y = y + block.mlp(block.mlp_norm(y))
        return y

    def output_projection():
        return project(model.decoder_norm(x)[:, 0])

    return {name: backends.compiled(fn, [model], mode) for name, fn in
            (("attention", attention), ("mlp", mlp),
             ("output projection", output_projection))}


RATIO_COLUMNS = ["variant", "batch", "mode", "dense tokens/s", "masked",
                 "default", "allocated", "two-stage", "default step",
                 "allocated step", "two-stage step", "dense step/probe"]


def ratio_table(rows):
    """One row per variant, batch and mode: tokens/s over dense tokens/s of
    `generate` (encoder included) per Top-k case, dense step time over the
    case's step time (decoding alone), dense step over probe time."""
    groups = {}
    for row in rows:
        key = (row["variant"], row["batch"], row["mode"])
        group = groups.setdefault(key, dict(zip(RATIO_COLUMNS, key)))
        if row["case"] == "dense":
            group["dense tokens/s"] = row["tokens_per_s"]
            group["dense step/probe"] = row["step_over_probe"]
            continue
        path = row["case"].split(" ", 1)[1]
        group[path] = row["throughput_ratio"]
        if f"{path} step" in RATIO_COLUMNS:
            group[f"{path} step"] = row["step_ratio"]
    return list(groups.values())


def _time(args, variant, models, probes, result):
    """Times every case at each batch and mode into `result["rows"]`."""
    for batch in args.batches:
        tokens = keras.ops.convert_to_tensor(np.random.default_rng(
            batch).integers(1, args.vocab_size,
                            size=(batch, args.source_length)), "int32")
        for mode in args.modes:
            # The probes run in the same rounds, so that they meet the
            # machine's load of the moment too.
            cases = dict(probes)
            for name, model in models.items():
                cases[name] = _generate(model, tokens, args, mode)
                cases[f"{name} encoder"] = _encode(model, tokens, mode)
            start = time.perf_counter()
            times = measure(cases, args.repeats)
            probe = {name.split(" ", 1)[1]: float(np.median(times[name]))
                     for name in probes}
            probe_ms = 1e3 * min(probe.values())
            dense = float(np.median(times["dense"]))
            dense_step = (dense - float(np.median(
                times["dense encoder"]))) / args.max_length
            for name in models:
                generate = float(np.median(times[name]))
                encode = float(np.median(times[f"{name} encoder"]))
                step = (generate - encode) / args.max_length
                result["rows"].append({
                    "variant": variant, "batch": batch, "mode": mode,
                    "case": name, "generate_ms": 1e3 * generate,
                    "generate_min_ms": 1e3 * min(times[name]),
                    "encode_ms": 1e3 * encode, "step_ms": 1e3 * step,
                    "tokens_per_s": batch * args.max_length / generate,
                    "throughput_ratio": dense / generate,
                    "step_ratio": dense_step / step,
                    "probe_ms": probe_ms,
                    "step_over_probe": 1e3 * step / probe_ms})
            print(f"  batch {batch}, {mode}: "
                  f"{time.perf_counter() - start:.0f} s; probe "
                  + ", ".join(f"{k} {1e3 * v:.1f} ms"
                              for k, v in probe.items()), flush=True)


def _profile(args, variant, models, result):
    """Times the parts of a batch-1 step into `result["profile"]`."""
    for mode in args.modes:
        cases = {}
        for name, model in models.items():
            for part, fn in _step_parts(model, 1, args, mode).items():
                cases[(name, part)] = fn
        times = measure(cases, 4 * args.repeats)
        for (name, part), t in times.items():
            result["profile"].append({
                "variant": variant, "mode": mode, "case": name,
                "part": part, "median_ms": 1e3 * float(np.median(t))})


def _stage(args):
    """One variant's timing (`--stage time`, with its probe record) or
    profile (`--stage profile`), written to `--json`."""
    result = {"probes": [], "rows": [], "profile": []}
    variant, = args.variants
    batches = _calibration_batches(args)
    models, allocated = _models(args, variant, batches)
    if args.stage == "profile":
        _profile(args, variant, models, result)
    else:
        recall = _calibrate(args, models[f"top-{args.k} two-stage"], batches)
        probes = memory_probes(models["dense"])
        mb = sum(w.numpy().nbytes
                 for w in step_weights(models["dense"])) / 1e6
        result["probes"].append({"variant": variant, "weights_mb": mb,
                                 "two_stage_recall": recall,
                                 "allocated_k": allocated.k,
                                 "allocated_mean_k": allocated.mean_k})
        print(f"\n{variant}: a decoding step reads {mb:.1f} MB of weights; "
              f"two-stage recall {recall:.3f}; allocated k (mean "
              f"{allocated.mean_k:.1f}): "
              + ", ".join(map(str, allocated.k.values())), flush=True)
        _time(args, variant, models, probes, result)
    with open(args.json, "w") as f:
        json.dump(result, f)


def _run_stages(args, argv):
    """Each variant's timing, then its profile, each in a process of its
    own (`argv` with `--variants`, `--stage` and `--json` appended: the
    last of an option counts), merged. A process's compiled functions stay until it ends: in
    one, a TensorFlow run with `--profile` ran out of memory in Base's
    profile (LLVM "Cannot allocate memory", 23 GB machine)."""
    recorded = {key: value for key, value in vars(args).items()
                if key != "stage"}
    result = {"args": recorded, **backends.record(), "probes": [],
              "rows": [], "profile": []}
    stages = ["time"] + (["profile"] if args.profile else [])
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variants:
            for stage in stages:
                path = os.path.join(folder, f"{variant}_{stage}.json")
                subprocess.run(
                    [sys.executable, __file__, *argv, "--variants", variant,
                     "--stage", stage, "--json", path], check=True)
                with open(path) as f:
                    for key, values in json.load(f).items():
                        result[key] += values
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["small", "base"],
                        choices=sorted(T5_VARIANTS))
    parser.add_argument("--vocab_size", type=int, default=32128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--source_length", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=32,
                        help="tokens generated per sequence")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--modes", nargs="+", default=list(MODES),
                        choices=list(MODES))
    parser.add_argument("--rank", type=int, default=64,
                        help="two-stage scoring: rank of the first stage")
    parser.add_argument("--candidates", type=int, default=256,
                        help="two-stage scoring: neurons rescored per token")
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="time the parts of a batch-1 step apart")
    parser.add_argument("--json", default=backends.json_path("decode"))
    parser.add_argument("--stage", choices=["time", "profile"],
                        help=argparse.SUPPRESS)  # one process's part
    args = parser.parse_args()
    if args.stage:
        return _stage(args)

    result = _run_stages(args, sys.argv[1:])
    print_table(
        f"T5.generate, {args.source_length} source tokens, "
        f"{args.max_length} generated, k={args.k}: tokens/s, Top-k tokens/s "
        "over dense tokens/s, and a decoding step's time over the memory "
        "probe's", result["rows"],
        ["variant", "batch", "mode", "case", "generate_ms", "step_ms",
         "probe_ms", "tokens_per_s", "throughput_ratio", "step_over_probe"])
    print_table("Side by side: dense tokens/s; each Top-k case's tokens/s "
                "over dense (>1: faster), encoder included; dense step time "
                "over the case's (decoding alone); dense step / probe",
                ratio_table(result["rows"]), RATIO_COLUMNS)
    if result["profile"]:
        print_table("Parts of a batch-1 decoding step, timed apart",
                    result["profile"],
                    ["variant", "mode", "case", "part", "median_ms"])
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
