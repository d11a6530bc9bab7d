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

Choosing k (topk_sparse.allocation) for the dense model, without
fine-tuning, at a mean k of 16 of 256 (seeds 0-4, one host; dense
99.96-100.00% tokens): one k per MLP allocated on 256 training sequences
against the same k everywhere, on the test sequences:

    allocated (16, 8, 24, 16)  97.67-98.59% tokens  loss 0.037-0.054
    uniform   (16, 16, 16, 16) 95.80-97.52% tokens  loss 0.059-0.103
    allocated - uniform: +1.65 points [+1.01, +2.28], loss -0.033
    [-0.047, -0.018] (paired by seed, 95% t-intervals)

The allocation (encoder 0, 1, decoder 0, 1) was the same on every seed.

    for seed in 0 1 2 3 4; do python -m trainers.t5 --config.model.k=None \
        --config.seed=$seed --config.eval.allocate.mean_k=16 \
        --workdir=/tmp/allocate/t5-$seed; done
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
