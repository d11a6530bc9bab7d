r"""T5-Small with Top-k MLPs on WMT14 English to German, from scratch.

WMT14 de-en (wmt14_translate/de-en: about 4.5M sentence pairs; newstest2013
is its TFDS "validation" split, newstest2014 its "test") must be prepared
first, outside this run, on a machine with network access:
`tfds build wmt14_translate/de-en --data_dir=gs://BUCKET/tensorflow_datasets`.
On a TPU VM, TPUStrategy and bfloat16:

    python -m trainers.t5 --config=configs/t5_wmt.py \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
        --workdir=gs://BUCKET/topk_sparse/t5_small_wmt_top128
    # Dense baseline:  ... --config.model.k=None
    # newstest2014:    ... --config.data.eval_split=test
    python -m trainers.t5 --config=configs/t5_wmt.py:runlocal

T5-Small: 6+6 layers, width 512, mlp_dim 2048. Top-128 keeps 128 of 2048
activations per token.

Expected: not measured (no TPU or WMT data on the machine this was written
on). The trainer reports teacher-forced token accuracy on newstest2013 and
the exact match of greedy decoding, not BLEU. Tokens are UTF-8 bytes, so
neither loss nor accuracy is comparable with SentencePiece T5's BLEU
(Raffel et al., arXiv 1910.10683). The question this run answers
is the paper's (arXiv 2210.06313): how far Top-128 is from the dense
baseline in token accuracy, and the nonzero fraction of the dense MLPs.

Recipe: T5's supervised setting (Raffel et al., Sec. 3.1): task prefix
"translate English to German: ", batch 128 pairs, Adafactor, dropout 0.1,
2^18 steps. Deviations: trained from scratch (this trainer does not load a
pretrained checkpoint), so the learning rate follows T5's pretraining
schedule (1/sqrt(max(step, 10^4))) rather than fine-tuning's constant 1e-3;
inputs and targets are 512 bytes each (T5: sequences of 512 SentencePiece
tokens), and a longer sentence is truncated, as in T5.
"""

import ml_collections

from topk_sparse.configs import common


def get_config(arg=None):
    """`arg`: "runlocal" shrinks the run to a CPU smoke test."""
    arg = common.parse_arg(arg, runlocal=False)
    config = common.base_config()
    config.mixed_precision = "mixed_bfloat16"
    config.steps_per_execution = 100

    # vocab_size comes from the data (256 bytes, 3 specials and 100 unused
    # sentinels: 359). None is the dense ReLU baseline; "auto" is
    # approx_max_k (TPU-KNN, recall 0.95) on TPU.
    config.model = common.model("t5", k=128, variant="small",
                                dropout_rate=0.1)

    # English to German; eval_split "test" is newstest2014.
    config.data = ml_collections.ConfigDict()
    config.data.name = "wmt"
    config.data.dataset = "wmt14_translate/de-en"
    config.data.source_language = "en"
    config.data.target_language = "de"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    config.data.source_length = 512
    config.data.target_length = 512
    config.data.task_prefix = True
    config.data.eval_split = "validation"  # newstest2013
    # None: the whole eval split.
    config.data.num_eval_examples = ml_collections.config_dict.placeholder(
        int)
    config.data.shuffle_buffer = 10_000
    config.batch_size = 128
    config.epochs = 50  # reporting intervals: 50 x 5243 ~ 2^18 steps
    config.steps_per_epoch = 5243

    config.optimizer = common.t5_optimizer()

    # Teacher-forced token accuracy on the whole eval split; exact match of
    # greedy decoding (whole sentences: expect it low) on
    # `generate_examples` pairs.
    config.eval.batch_size = 128
    config.eval.every_epochs = 5
    config.eval.generate_examples = 256

    if arg.runlocal:
        common.runlocal(config, steps_per_epoch=2, batch_size=4)
        config.model.variant = "tiny"
        config.model.k = 32
        config.data.source_length = 64  # the task prefix alone is 29 bytes
        config.data.target_length = 32
        config.data.num_eval_examples = 8
    return config
