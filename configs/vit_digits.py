r"""ViT-micro with Top-k MLPs on scikit-learn's digits: the no-network default.

Trains in process on the 1,797 8x8 digits that ship with scikit-learn
(1,437 train / 360 test, a fixed stratified split), upsampled to 16x16 and cut
into 4x4 patches: 16 tokens, 2 blocks, width 32, mlp_dim 128, Top-32.

    python -m trainers.vit --workdir=/tmp/topk_sparse-runs/vit
    python -m trainers.vit --config=configs/vit_digits.py \
        --config.model.k=None --workdir=/tmp/topk_sparse-runs/vit_dense
    python -m trainers.vit --config=configs/vit_digits.py:runlocal  # seconds

Measured on one host over seeds 0-4 (2-core CPU, TF 2.20, float32,
jit_compile; 30 epochs = 660 steps of 64): test accuracy, mean nonzero fraction of the MLP
activations on the test split, ECE (15 bins):

    k=None (dense)  95.6-96.9%  42.0-43.5% nonzero  ECE 0.016-0.028
    k=32 (default)  96.1-97.2%  25.0% nonzero       ECE 0.015-0.028

    for seed in 0 1 2 3 4; do python -m trainers.vit --config.seed=$seed \
        --config.verbose=0 --workdir=/tmp/seeds/top32-$seed; done

The same seeds on the JAX backend (KERAS_BACKEND=jax, JAX 0.10, one
device; the same command with --workdir=/tmp/jax-seeds/...): its kernels
and dropout masks are JAX's, so these are other runs, in ranges that
overlap TensorFlow's:

    k=None (dense)  95.6-98.1%  41.2-44.5% nonzero  ECE 0.015-0.025
    k=32 (default)  95.6-97.2%  24.9-25.0% nonzero  ECE 0.012-0.034

One host prints the same report on every run, bit for bit, however busy;
hosts of one machine kind differ in their CPUs' float kernels (seed 0's
Top-32 accuracy was 96.1%, 96.7% and 97.8% on three of them), so compare
a run with the range, not with one host's digits.

Five seeds of dense vs Top-k at mlp_dim 512, with label noise and
corruptions: results/README.md (`python -m trainers.study`).

Choosing k (topk_sparse.allocation) for the dense model, without
fine-tuning, at a mean k of 16 of 128 (seeds 0-4, one host): one k per MLP
allocated on 256 training images against the same k everywhere, test
accuracy, allocated - uniform paired by seed (95% t-interval):

    2 blocks (this config)  allocated 95.56-97.50%  uniform 95.28-97.50%
                            -0.06 points [-0.43, +0.32]: no difference
    6 blocks (depth=6)      allocated 95.56-97.78%  uniform 94.72-97.78%
                            +0.50 points [+0.05, +0.95]

Two alike MLPs leave the search little to choose ((16, 16) or (20, 12));
of six, the first gets the most (20-28) on every seed.

    for seed in 0 1 2 3 4; do python -m trainers.vit --config.model.k=None \
        --config.seed=$seed --config.eval.allocate.mean_k=16 \
        --config.eval.corruptions="()" --workdir=/tmp/allocate/vit-$seed
    done   # and --config.model.depth=6

The test split has 360 images (one is 0.28%): with one seed, differences
below about 1.5% are noise.
"""

import ml_collections

from topk_sparse.configs import common


def get_config(arg=None):
    """`arg`: "runlocal" shrinks the run to a seconds-long smoke test."""
    arg = common.parse_arg(arg, runlocal=False)
    config = common.base_config()

    # topk_sparse.models.ViT arguments; image_size, channels and num_classes
    # come from the data. k of mlp_dim=128; None is the dense ReLU baseline.
    config.model = common.model("vit", k=32, variant="micro", patch_size=4,
                                pooling="gap", dropout_rate=0.0)

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.label_noise = 0.0  # the paper's Table 1 uses 0.4 and 0.8
    config.batch_size = 64
    config.epochs = 30

    config.optimizer.learning_rate = 3e-3

    config.eval.batch_size = 120
    config.eval.every_epochs = 5
    config.eval.corruptions = common.CORRUPTIONS

    if arg.runlocal:
        common.runlocal(config)
    return config
