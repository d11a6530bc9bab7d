r"""Trains and evaluates a Top-k T5 encoder-decoder.

    python -m trainers.t5
    python -m trainers.t5 --config=configs/t5_small_c4.py \
        --config.model.k=128 --workdir=/tmp/topk_sparse-runs/t5_small_c4

With no `--config` it trains configs/t5_synthetic.py (a task generated in
process: no network, minutes on a CPU). Starting it again with the same
config (or `--workdir`) resumes a killed run; a workdir refuses a config
other than its own.
"""

from . import define_flags, run

define_flags("t5_synthetic.py")


def main():
    """The console script `topk-sparse-t5`."""
    run("t5")


if __name__ == "__main__":
    main()
