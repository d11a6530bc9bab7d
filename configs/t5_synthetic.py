r"""T5-tiny with Top-k MLPs on a synthetic seq2seq task: no-network default.

The task is generated in process (topk_sparse.data.text): sort a random
sequence of 4-12 tokens over a 30-token alphabet. Infinite, seeded data, so
the "epochs" are just reporting intervals.

    python -m trainers.t5 --workdir=/tmp/topk_sparse/t5
    python -m trainers.t5 --config=configs/t5_synthetic.py \
        --config.model.k=None --workdir=/tmp/topk_sparse/t5_dense
    python -m trainers.t5 --config=configs/t5_synthetic.py:runlocal  # seconds

Expected: about 99.9% token accuracy and 99-100% exact match of greedy
decoding, dense or Top-64, in about 1-3 minutes on a 2-core CPU; the
measured numbers are in README.md, Results.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    """`arg`: "runlocal" shrinks the run to a seconds-long smoke test."""
    arg = common.parse_arg(arg, runlocal=False)
    config = common.base_config()

    # topk_sparse.models.T5 arguments; vocab_size comes from the data.
    # k of mlp_dim=256; None is the dense ReLU baseline.
    config.model = common.model("t5", k=64, variant="tiny", dropout_rate=0.0)

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic"
    config.data.task = "sort"  # sort | reverse | copy
    config.data.vocab_size = 32
    config.data.min_length = 4
    config.data.max_length = 12
    config.data.num_eval_examples = 512
    config.batch_size = 64
    config.epochs = 10  # infinite data: epochs are reporting intervals
    config.steps_per_epoch = 100

    config.optimizer.learning_rate = 3e-3

    # Token accuracy (teacher forcing) on every test example; exact match
    # of greedy decoding on `generate_examples` of them.
    config.eval.every_epochs = 5
    config.eval.generate_examples = 256

    if arg.runlocal:
        common.runlocal(config, batch_size=16)
        config.data.num_eval_examples = 32
    return config
