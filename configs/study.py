r"""The Lazy Neuron study: a grid of ViT and T5 runs testing its claims.

    python -m trainers.study --config=configs/study.py --workdir=/tmp/study
    python -m trainers.study --config=configs/study.py:quick  # minutes, CI
    python -m trainers.study --config=configs/study.py:data=tpu  # TPU
    python -m trainers.study --config=configs/study.py:parts=allocation \
        --workdir=/tmp/allocation  # only the choosing-k cells

Each run is one `topk_sparse.training.train` in `<workdir>/runs/<run>`;
runs with a report.json are skipped, so a killed study resumes. The grid and
the statistics are `topk_sparse.study`. The claims, from Li et al., The Lazy
Neuron Phenomenon (https://arxiv.org/abs/2210.06313; its numbers beside ours
in results/README.md):

1. MLP activations are sparse at every layer, train and eval data alike;
   about 50% nonzero at initialization, falling during training.
2. Wider MLPs give a lower nonzero share; deeper models sparser middles.
3. Sparsity also emerges with random labels, random inputs, unlimited data.
4. Top-k below the natural level: less sensitive to 40% / 80% label noise,
   more robust to Gaussian / impulse / shot noise, better calibrated (ECE),
   about the same clean accuracy (Table 1).

Beside the claims, the `allocation` part (choosing k, not in the paper):
at the same mean k, one k per MLP allocated on a dense model
(`topk_sparse.allocation`) against the same k everywhere, without
fine-tuning and after fine-tuning each from the dense run of its seed.

`data=digits` (default): ViT on scikit-learn's digits, mlp_dim 512 (the
configs/vit_digits.py model with a 16x wide MLP: its own 128-wide MLP stays
at 43% nonzero, too narrow for sparsity to emerge in 660 steps) and T5-tiny
on the synthetic sorting task (an unlimited, never repeated stream).
`data=tpu`: ViT-tiny on CIFAR-10 and T5-Small on C4 (TFDS, prepared
beforehand), same grid; not run here. The claim-4 k values are set below the
natural level measured for the dense model (dense ViT, mlp_dim 512, 30
epochs, seed 0: 39.7% nonzero, ~203 of 512 units): k = 128 and 64.

Measured (results/: README.md, study.json, plots): 69 runs, 17 cells, 78
min on a shared 2-core CPU with two processes sharing the grid (started
twice with `nice -n 19 ... &`, then aggregated with `--config.train=False`).
A Top-k run takes about 2.5x a dense one here (exact top_k without XLA).
That was the claims part alone, before the allocation part existed.

The allocation part (results/allocation/: `parts=allocation`, 30 runs, 5
seeds; one host, 2-core CPU, TF 2.20): allocated minus uniform k, paired
by seed (95% t-intervals), on the test split:

    T5-tiny, mean k 16 of 256 (allocated 16, 8, 24, 16 on every seed)
      no fine-tuning  token accuracy +2.09 pts [+1.00, +3.18], loss -0.043
      fine-tuned      +0.03 pts [-0.04, +0.11]: both back at dense (-0.08)
    ViT, 6 blocks, mean k 32 of 512 (the first MLP 48-64 on every seed)
      no fine-tuning  accuracy +0.06 pts [-0.23, +0.34], loss -0.019
                      [-0.043, +0.005]: not significant
      fine-tuned      +0.39 pts [-0.63, +1.41]: not significant

Most of its time is the dense runs' allocation evaluation (`by="model"`,
eager passes): 8-10 min for a 6-block ViT beside its 1-2 min of training
while another process shared the CPU (35 min with two others); the
fine-tunings take the k of that evaluation (`warm_start._reported`; all
but T5's first, run before that existed) and take 1-80 s each.
"""

import ml_collections

from topk_sparse.configs import (common, t5_small_c4, t5_synthetic,
                                 vit_cifar10, vit_digits)


def get_config(arg=None):
    """`arg`: "quick" (a minutes-long smoke grid), "data=digits|tpu",
    "parts=claims|allocation" (one part of the grid; default both)."""
    arg = common.parse_arg(arg, quick=False, data="digits", parts="")
    config = ml_collections.ConfigDict()
    # The parts of the grid: "claims" (the paper's claims 1-4, which share
    # their cells) and "allocation" (choosing k).
    config.parts = (arg.parts,) if arg.parts else ("claims", "allocation")

    # Model: the dense baselines every cell starts from.
    if arg.data == "digits":
        config.vit = vit_digits.get_config()
        config.vit.model.mlp_dim = 512
        config.t5 = t5_synthetic.get_config()
        config.t5.eval.generate_examples = 0  # token accuracy is enough
    elif arg.data == "tpu":
        config.vit = vit_cifar10.get_config()
        config.t5 = t5_small_c4.get_config()
    else:
        raise ValueError(f"data must be 'digits' or 'tpu', got {arg.data!r}.")
    for base in (config.vit, config.t5):
        base.model.k = None
        base.eval.every_epochs = 1  # the eval nonzero curve, per epoch
        base.eval.corruptions = ()  # only the claim-4 clean cells
        base.verbose = 0
    if arg.data == "digits":
        # Compiling costs more than it saves on models this small: a
        # 660-step ViT run took 61 s without XLA, 79 s with (shared CPU).
        config.vit.jit_compile = config.t5.jit_compile = False

    # Seeds: claims 1-3 per cell; claim 4 (paired Top-k vs dense) per cell.
    config.seeds = 3
    config.claim4_seeds = 5
    config.confidence = 0.95  # two-sided t-interval over seeds

    # Sparsity (claim 4): Top-k at two k below the dense model's natural
    # level; label noise as in the paper's Table 1; its three noises at
    # all five severities.
    config.k = (128, 64) if arg.data == "digits" else (32, 16)
    config.label_noise = (0.0, 0.4, 0.8)
    config.corruptions = ("gaussian_noise", "impulse_noise", "shot_noise")
    config.severities = (1, 2, 3, 4, 5)

    # Claim 2: mlp_dim sweep (depth of the base) and depth sweep (mlp_dim of
    # the base).
    config.widths = (128, 256, 512, 1024)
    config.depths = (2, 4, 6)

    # Claim 3: label_noise 1.0 (every label random), random images
    # (`study.RANDOM_IMAGES`), and T5's unlimited stream.
    config.random_examples = 1437  # digits' training split size

    # Claim 1: step-0 nonzero fraction, from this many training batches and
    # the whole evaluation split.
    config.init_batches = 8

    # Choosing k (topk_sparse.allocation): at a mean k of `mean_k` (1/16 of
    # mlp_dim, about the paper's ViT-B/16 share of 6.3%), one k per MLP
    # allocated on config.eval.allocate.examples training examples
    # against `mean_k` everywhere, on the dense model (its evaluation, no
    # fine-tuning) and fine-tuned from it (k "auto:<mean_k>" vs k=mean_k,
    # `epochs` at `learning_rate`, no warmup: at the configs' 3e-3 with
    # warmup a fine-tuned digits ViT fell to 92.8%, at 3e-4 it held 96.9%).
    # The ViT has 6 blocks: of the base's two alike MLPs the search chose
    # (16, 16) or (20, 12), no better than uniform (configs/vit_digits.py).
    config.allocation = ml_collections.ConfigDict()
    config.allocation.vit = ml_collections.ConfigDict({
        "depth": 6, "mean_k": 32, "epochs": 5, "learning_rate": 3e-4})
    config.allocation.t5 = ml_collections.ConfigDict({
        "mean_k": 16, "epochs": 2, "learning_rate": 1e-3})

    # False: train nothing, aggregate the runs already finished
    # (--config.train=False after a study was stopped).
    config.train = True

    if arg.quick:
        for base in (config.vit, config.t5):
            common.runlocal(base, steps_per_epoch=4)
            base.eval.every_epochs = 1
            base.eval.corruptions = ()
            base.verbose = 0
            base.jit_compile = False  # compiling costs more than 8 steps
        config.vit.model.mlp_dim = 64
        config.t5.batch_size = config.t5.eval.batch_size = 16
        config.t5.data.num_eval_examples = 32
        config.t5.eval.generate_examples = 0
        config.seeds = config.claim4_seeds = 2
        config.k = (8,)
        config.label_noise = (0.0, 0.8)
        config.corruptions = ("gaussian_noise",)
        config.severities = (1, 5)
        config.widths = (32, 64)
        config.depths = (1, 2)
        config.random_examples = 64
        config.init_batches = 2
        config.allocation.vit.update(depth=2, mean_k=8, epochs=1)
        config.allocation.t5.update(mean_k=16, epochs=1)
        for base in (config.vit, config.t5):  # a few greedy steps
            base.eval.allocate.examples = 32
            base.eval.allocate.step = 16
    return config
