"""Recall of the approximate Top-k methods against the exact top-k.

For `"approx"` (TPU-KNN's binned top-k, the portable version off TPU) the
measured recall must reach `recall_target`, and `ops.expected_recall` (the
exact expectation over random positions of the top k, for the strided
bins) should predict it. `"statistical"` (the Gaussian cutoff)
has no recall target: its recall and the entries it keeps per row are
reported. Two-stage scoring (`topk_sparse.scoring`: a rank-r first stage
fitted to the layer's inputs, then `candidates` neurons rescored exactly)
reports its recall and the cosine of the MLP output to the exact path's.
Recall counts the positive entries of the exact top-k that a method keeps.

Rows come from two sources:
- random: iid standard normal rows, `--rows` x `--mlp_dim`; for two-stage
  scoring, iid normal inputs of width `--width` through a random MLP (inputs
  that fill every direction: the worst case of a low-rank first stage);
- trained: the MLPs of a trained model on its test split (two-stage scorers
  calibrated on the train split), from a trainer's workdir (`--workdir`,
  which holds `model.keras` and `config.json`). Without `--workdir`, a
  dense ReLU ViT of width 768 and mlp_dim 3072 (the MLP of ViT-B, 2 blocks)
  is trained here first on the digits default, a couple of minutes on 2 CPU
  cores. Digits tokens are 4x4 patches: they span few directions, which
  flatters two-stage scoring; measure your own model with `--workdir`.

Usage:
  python benchmarks/recall.py
  python benchmarks/recall.py --workdir=/tmp/topk_sparse-runs/vit --k 8 16
"""

import argparse
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from topk_mlp import print_table  # noqa: E402
from topk_sparse import data, models, ops, scoring, training  # noqa: E402, F401
from topk_sparse.layers import SparseMLP  # noqa: E402


def recall(x, k, method, recall_target):
    """(recall of the exact top-k, mean kept per row) of `method` on `x`."""
    n = x.shape[-1]
    top = tf.math.top_k(x, k).indices
    true = (ops.indices_to_mask(top, n, tf.float32) > 0) & (x > 0)
    if method == "statistical":
        kept = ops.topk_mask(x, k, method) > 0
    else:
        _, indices = ops.topk_indices(x, k, method, recall_target)
        kept = (ops.indices_to_mask(indices, n, tf.float32) > 0) & (x > 0)
    hits = tf.reduce_sum(tf.cast(kept & true, tf.float64))
    recall_ = float(hits / tf.reduce_sum(tf.cast(true, tf.float64)))
    kept_per_row = float(tf.reduce_mean(tf.reduce_sum(
        tf.cast(kept, tf.float64), -1)))
    return recall_, kept_per_row


def table(source, rows, ks, recall_targets):
    out = []
    n = rows.shape[-1]
    for k in ks:
        for target in recall_targets:
            r, kept = recall(rows, k, "approx", target)
            out.append({
                "source": source, "n": n, "k": k, "method": "approx",
                "recall_target": target,
                "bins": ops.approx_bin_count(n, k, target),
                "expected_recall": ops.expected_recall(n, k, target),
                "recall": r, "kept_per_row": kept})
        r, kept = recall(rows, k, "statistical", 1.0)
        out.append({"source": source, "n": n, "k": k, "method": "statistical",
                    "recall_target": None, "bins": None,
                    "expected_recall": None, "recall": r,
                    "kept_per_row": kept})
    return out


def two_stage_table(source, mlp, calibration, held_out, ranks, candidates):
    out = []
    d = held_out.shape[-1]
    for rank in [r for r in ranks if r <= min(d, mlp.mlp_dim)]:
        for count in [c for c in candidates if mlp.k <= c <= mlp.mlp_dim]:
            scoring.calibrate_mlp(mlp, calibration, rank, count)
            quality = scoring.measure_two_stage(mlp, held_out)
            out.append({"source": source, "d": d, "n": mlp.mlp_dim,
                        "k": mlp.k, "rank": rank, "candidates": count,
                        **quality})
    mlp.scorer = None
    return out


def recorded_inputs(model, config, split):
    """`{mlp path: inputs [tokens, d]}` of `model` on a split of its data."""
    dataset, _ = data.load(config.data, split, config.eval.batch_size,
                           train=False, seed=config.seed)
    mlps = model.sparse_mlps()
    with scoring.recording_inputs(mlps) as records:
        for batch in dataset:
            model(batch[0], training=False)
    return {name: tf.concat(parts, 0) for name, parts in records.items()}


def trained_tables(workdir, args):
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    # Importing topk_sparse.models registered ViT and T5 for loading.
    model = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    test = recorded_inputs(model, config, "test")
    train = recorded_inputs(model, config, "train")
    rows, two_stage = [], []
    for name, mlp in model.sparse_mlps().items():
        source = f"trained {name}"
        hidden = mlp.pre_activations(test[name])
        ks = [k for k in args.k if k <= hidden.shape[-1]]
        rows += table(source, hidden, ks, args.recall_targets)
        for k in ks:
            sparse = SparseMLP.from_config({**mlp.get_config(), "k": k})
            sparse.build(test[name].shape)
            sparse.set_weights(mlp.get_weights())
            two_stage += two_stage_table(source, sparse, train[name],
                                         test[name], args.ranks,
                                         args.candidates)
    return rows, two_stage


def random_two_stage(args):
    out = []
    x = tf.random.stateless_normal([2 * args.rows, args.width], seed=[0, 2])
    for k in args.k:
        mlp = SparseMLP(args.mlp_dim, k=k, bias_initializer="random_normal")
        mlp.build((None, args.width))
        out += two_stage_table("random", mlp, x[:args.rows], x[args.rows:],
                               args.ranks, args.candidates)
    return out


def train_wide_vit(workdir):
    from topk_sparse.configs import vit_digits

    config = vit_digits.get_config()
    config.model.k = None  # dense ReLU: the activations the paper measures
    config.model.width = 768
    config.model.num_heads = 12
    config.model.mlp_dim = 3072
    config.optimizer.learning_rate = 1e-3
    config.epochs = 10
    config.eval.corruptions = ()
    config.verbose = 0
    training.train(config, workdir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlp_dim", type=int, default=3072)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--recall_targets", type=float, nargs="+",
                        default=[0.9, 0.95, 0.99])
    parser.add_argument("--width", type=int, default=768,
                        help="input width of the random two-stage rows")
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128],
                        help="two-stage scoring: first-stage ranks")
    parser.add_argument("--candidates", type=int, nargs="+",
                        default=[128, 256],
                        help="two-stage scoring: neurons rescored per token")
    parser.add_argument("--workdir", default=None,
                        help="a trainer's workdir; default: train one here")
    parser.add_argument("--json", default="benchmarks/recall.json")
    args = parser.parse_args()

    random_rows = tf.random.stateless_normal([args.rows, args.mlp_dim],
                                            seed=[0, 1])
    rows = table("random", random_rows, args.k, args.recall_targets)
    two_stage = random_two_stage(args)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir
        if workdir is None:
            workdir = tmp
            train_wide_vit(workdir)
        trained_rows, trained_two_stage = trained_tables(workdir, args)
    rows += trained_rows
    two_stage += trained_two_stage
    print_table("Recall of the exact top-k", rows, [
        "source", "n", "k", "method", "recall_target", "bins",
        "expected_recall", "recall", "kept_per_row"])
    print_table("Two-stage scoring on held-out tokens: recall of the exact "
                "top-k, cosine of the output to the exact path's",
                two_stage, ["source", "d", "n", "k", "rank", "candidates",
                            "recall", "cosine"])
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "tensorflow": tf.__version__,
                   "rows": rows, "two_stage": two_stage}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
