r"""T5-tiny with Top-k MLPs on a synthetic seq2seq task: no-network default.

The task is generated in process (topk_sparse.data.text): sort a random
sequence of 4-12 tokens over a 30-token alphabet. Infinite, seeded data, so
the "epochs" are just reporting intervals.

    python -m trainers.t5 --workdir=/tmp/topk_sparse-runs/t5
    python -m trainers.t5 --config=configs/t5_synthetic.py \
        --config.model.k=None --workdir=/tmp/topk_sparse-runs/t5_dense
    python -m trainers.t5 --config=configs/t5_synthetic.py:runlocal  # seconds

Measured (2-core CPU, TF 2.20, float32, jit_compile, seed 0; 1,000 steps of
64 sequences): token accuracy on 512 test sequences, exact match of greedy
decoding on 256, mean nonzero fraction, wall time:

    k=None (dense)  99.98% tokens  100.0% exact  42.6% nonzero   58 s
    k=64 (default)  99.96% tokens   99.2% exact  25.0% nonzero  103 s
"""

import ml_collections

from topk_sparse.configs import common


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
