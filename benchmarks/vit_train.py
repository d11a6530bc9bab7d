"""ViT training throughput: Top-k MLPs vs dense ReLU MLPs, side by side.

Images per second of `model.train_on_batch` (AdamW, cross-entropy, the
layers' sparsity metrics on, as in `python -m trainers.vit`) for the dense
ReLU ViT and the same ViT with Top-k MLPs by each method, in tf.function and
jit_compile=True modes. Cases are interleaved step by step; ratios are
medians over the dense model's (>= 1 means Top-k trains as fast).

Usage:
  python benchmarks/vit_train.py                  # ViT-Ti/16, 112px, k=64
  python benchmarks/vit_train.py --variant=S/16 --batch=8 --k 128
"""

import argparse
import functools
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from topk_mlp import measure, print_table  # noqa: E402
from topk_sparse.models import ViT  # noqa: E402


def _model(args, jit, **kwargs):
    keras.utils.set_random_seed(0)
    model = ViT(args.variant, image_size=args.image_size, num_classes=1000,
                **kwargs)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  jit_compile=jit)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--methods", nargs="+",
                        default=["exact", "statistical"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="benchmarks/vit_train.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.image_size, args.image_size,
                              3)).astype("float32")
    labels = rng.integers(0, 1000, size=(args.batch,))
    rows = []
    for jit in (False, True):
        cases = {"dense relu": _model(args, jit)}
        for method in args.methods:
            cases[f"top-{args.k} {method}"] = _model(
                args, jit, k=args.k, method=method)
        times = measure({
            name: functools.partial(model.train_on_batch, images, labels)
            for name, model in cases.items()}, args.repeats)
        dense = np.median(times["dense relu"])
        for name, t in times.items():
            rows.append({
                "mode": "jit_compile" if jit else "tf.function", "case": name,
                "median_ms": 1e3 * float(np.median(t)),
                "images_per_s": args.batch / float(np.median(t)),
                "throughput_ratio": float(dense / np.median(t))})

    print_table(f"ViT-{args.variant} {args.image_size}px, batch "
                f"{args.batch}, train step: images/s, and dense time / time",
                rows, ["mode", "case", "median_ms", "images_per_s",
                       "throughput_ratio"])
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "tensorflow": tf.__version__,
                   "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
