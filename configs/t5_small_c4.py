r"""T5-Small with Top-k MLPs, pretrained on C4 with span corruption.

C4 (c4/en, about 800 GiB prepared) must be prepared first, outside this run:
`tfds build c4/en --data_dir=gs://BUCKET/tensorflow_datasets` (an Apache
Beam job). On a TPU VM, TPUStrategy and bfloat16:

    python -m trainers.t5 --config=configs/t5_small_c4.py \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
        --workdir=gs://BUCKET/topk_sparse/t5_small_top128
    # Dense baseline:  ... --config.model.k=None
    python -m trainers.t5 --config=configs/t5_small_c4.py:runlocal

T5-Small: 6+6 layers, width 512, mlp_dim 2048. Top-128 keeps 128 of 2048
activations per token.

Expected (paper, arXiv 2210.06313): trained T5-Base has 3.0% of its MLP
activations nonzero (2.7% averaged over layers, 1.1%-12.0% per layer), and
Top-128 comes within about 0.3% of dense for T5 Base/Large/3B. Not
reproduced here (no TPU or C4 on the machine this was written on).

Recipe: T5's pretraining (Raffel et al., arXiv 1910.10683, Sec. 3.1):
span corruption with 15% noise, batch 128 sequences, Adafactor, learning
rate 1/sqrt(max(step, 10^4)), 2^19 steps; dropout 0 as in T5.1.1 (T5 v1.0
pretrained with 0.1).
Deviation: tokens are UTF-8 bytes as in ByT5 (no vocabulary file needed
offline), so chunks are 1024 bytes with mean noise spans of 20 bytes
(ByT5's settings) instead of 512 SentencePiece tokens with spans of 3: loss
and accuracy are per byte and not comparable with SentencePiece T5.
"""

import ml_collections

from topk_sparse.configs import common


def get_config(arg=None, variant="small"):
    """`arg`: "runlocal" shrinks the run to a CPU smoke test."""
    arg = common.parse_arg(arg, runlocal=False)
    config = common.base_config()
    config.mixed_precision = "mixed_bfloat16"
    config.steps_per_execution = 100

    # vocab_size comes from the data (256 bytes, 3 specials and 100
    # sentinels: 359). None is the dense ReLU baseline; "auto" is
    # approx_max_k (TPU-KNN, recall 0.95) on TPU.
    config.model = common.model("t5", k=128, variant=variant,
                                dropout_rate=0.0)

    config.data = ml_collections.ConfigDict()
    config.data.name = "c4"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    config.data.input_length = 1024
    config.data.noise_density = 0.15
    config.data.mean_noise_span_length = 20.0
    config.data.num_eval_examples = 2048
    config.data.shuffle_buffer = 10_000
    config.batch_size = 128
    config.epochs = 100  # reporting intervals: 100 x 5243 ~ 2^19 steps
    config.steps_per_epoch = 5243

    config.optimizer = common.t5_optimizer()

    # Teacher-forced token accuracy on num_eval_examples chunks of C4's
    # validation split; exact match of whole spans is not informative.
    config.eval.batch_size = 128

    if arg.runlocal:
        common.runlocal(config, steps_per_epoch=2, batch_size=4)
        config.model.variant = "tiny"
        config.model.k = 32
        config.data.input_length = 64
        config.data.num_eval_examples = 8
    return config
