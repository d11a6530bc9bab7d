r"""Trains and evaluates a Top-k ViT classifier.

    python -m trainers.vit
    python -m trainers.vit --config=configs/vit_cifar10.py \
        --config.model.k=64 --workdir=/tmp/topk_sparse-runs/vit_cifar10

With no `--config` it trains configs/vit_digits.py (no network, minutes on a
CPU). Starting it again with the same config (or `--workdir`) resumes a
killed run; a workdir refuses a config other than its own.
"""

from . import define_flags, run

define_flags("vit_digits.py")


def main():
    """The console script `topk-sparse-vit`."""
    run("vit")


if __name__ == "__main__":
    main()
