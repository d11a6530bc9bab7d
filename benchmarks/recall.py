"""Recall of the approximate Top-k methods against the exact top-k.

For `"approx"` (TPU-KNN's binned top-k, the portable version off TPU) the
measured recall must reach `recall_target`, and `ops.expected_recall` (the
random-bin model) should predict it. `"statistical"` (the Gaussian cutoff)
has no recall target: its recall and the entries it keeps per row are
reported. Recall counts the positive entries of the exact top-k that a
method keeps.

Rows come from two sources:
- random: iid standard normal rows, `--rows` x `--n`;
- trained: the MLP pre-activations of a trained model on its test split,
  from a trainer's workdir (`--workdir`, which holds `model.keras` and
  `config.json`). Without `--workdir`, a ViT is trained here first on the
  digits default, with `mlp_dim=3072` so that the approximation actually
  bins (below 128 entries it is exact) -- about a minute on 2 CPU cores.

Usage:
  python benchmarks/recall.py
  python benchmarks/recall.py --workdir=/tmp/topk_sparse/vit --k 8 16
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# configs/ lives beside topk_sparse/ in the repository, not in the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from topk_mlp import print_table  # noqa: E402
from topk_sparse import data, models, ops, training  # noqa: E402, F401
from topk_sparse.layers import SparseMLP, _project  # noqa: E402


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


def trained_preactivations(workdir):
    """`{mlp name: [tokens, hidden]}` pre-activations on the test split."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    # Importing topk_sparse.models registered ViT and T5 for loading.
    model = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    dataset, _ = data.load(config.data, "test", config.eval.batch_size,
                           train=False, seed=config.seed)
    records = {}
    call = SparseMLP.call

    def recording_call(layer, inputs):  # eager: real values, not symbols
        hidden = _project(inputs, layer.intermediate_kernel,
                          layer.intermediate_bias)
        records.setdefault(layer.name, []).append(
            tf.reshape(hidden, [-1, hidden.shape[-1]]))
        return call(layer, inputs)

    SparseMLP.call = recording_call
    try:
        for batch in dataset:
            model(batch[0], training=False)
    finally:
        SparseMLP.call = call
    return {name: tf.concat(parts, 0) for name, parts in records.items()}


def train_wide_vit(workdir):
    from configs import vit_digits

    config = vit_digits.get_config()
    config.model.k = None  # dense ReLU: the activations the paper measures
    config.model.mlp_dim = 3072
    config.epochs = 10
    config.eval.corruptions = ()
    config.verbose = 0
    training.train(config, workdir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--recall_targets", type=float, nargs="+",
                        default=[0.9, 0.95, 0.99])
    parser.add_argument("--workdir", default=None,
                        help="a trainer's workdir; default: train one here")
    parser.add_argument("--json", default="benchmarks/recall.json")
    args = parser.parse_args()

    random_rows = tf.random.stateless_normal([args.rows, args.n], seed=[0, 1])
    rows = table("random", random_rows, args.k, args.recall_targets)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir
        if workdir is None:
            workdir = tmp
            train_wide_vit(workdir)
        for name, x in trained_preactivations(workdir).items():
            ks = [k for k in args.k if k <= x.shape[-1]]
            rows += table(f"trained {name}", x, ks, args.recall_targets)
    print_table("Recall of the exact top-k", rows, [
        "source", "n", "k", "method", "recall_target", "bins",
        "expected_recall", "recall", "kept_per_row"])
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "tensorflow": tf.__version__,
                   "rows": rows}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
