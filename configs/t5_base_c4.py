r"""T5-Base with Top-k MLPs, pretrained on C4: t5_small_c4.py's recipe.

Prepare C4 and run as in t5_small_c4.py, on a TPU VM (v3-8 / v4-8 or
larger), TPUStrategy and bfloat16:

    python -m trainers.t5 --config=configs/t5_base_c4.py \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
        --workdir=gs://BUCKET/topk_sparse/t5_base_top128
    # Dense baseline:  ... --config.model.k=None
    python -m trainers.t5 --config=configs/t5_base_c4.py:runlocal

T5-Base: 12+12 layers, width 768, mlp_dim 3072; Top-128 keeps 128 of 3072
activations per token.

Expected (paper, arXiv 2210.06313): trained T5-Base has 3.0% of its MLP
activations nonzero (2.7% averaged over layers, 1.1%-12.0% per layer), and
Top-128 comes within about 0.3% of dense. Not reproduced here (no TPU or C4
on the machine this was written on); bytes, not SentencePiece: see
t5_small_c4.py.
"""

from topk_sparse.configs import t5_small_c4


def get_config(arg=None):
    """t5_small_c4.py's run with T5-Base; `arg` as there."""
    return t5_small_c4.get_config(arg, variant="base")
