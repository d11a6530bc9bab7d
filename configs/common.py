"""What every training config shares: its argument, devices, optimizer, eval.

A config file builds on `base_config()`, which holds every key that
`topk_sparse.training.train` reads with its default, then sets its model,
data and recipe:

    config = common.base_config()
    config.model = common.model("vit", k=32, variant="micro", ...)
    config.data = ml_collections.ConfigDict({"name": "digits", ...})
"""

import types

import ml_collections
from ml_collections import config_dict

from topk_sparse.data import corruptions

# Every input corruption computed on the fly
# (`topk_sparse.data.corruptions.CORRUPTIONS`: CIFAR-10-C's noise, blur and
# digital families), for `config.eval.corruptions`.
CORRUPTIONS = tuple(corruptions.CORRUPTIONS)


def parse_arg(arg, **defaults):
    """Parses a config file's argument (`"runlocal"`, `"runlocal=True"`).

    Each `defaults` key is an allowed name with its default value, whose
    type converts the given string; a bare name means True. Returns a
    namespace (`arg.runlocal`).
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, _, value = item.partition("=")
        if name not in defaults:
            raise ValueError(f"Unknown config argument {name!r} in {arg!r}: "
                             f"choose from {sorted(defaults)}.")
        kind = type(defaults[name])
        if kind is bool:
            values[name] = value.lower() not in ("0", "false", "no") \
                if value else True
        else:
            values[name] = kind(value) if value else kind()
    return types.SimpleNamespace(**values)


def base_config():
    """Every key but `model` and `data`, at its default."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Devices (topk_sparse.distribute).
    config.strategy = "auto"  # auto | tpu | mirrored | cpu
    config.tpu = "local"      # TPU VM or Colab; a Cloud TPU name or grpc://
    # "mirrored" on a host without GPUs: split the CPU into this many
    # logical devices (None: as configured, one).
    config.num_cpu_devices = config_dict.placeholder(int)
    config.jit_compile = True  # False: TensorFlow without XLA; JAX compiles
    config.mixed_precision = "float32"  # "mixed_bfloat16" on TPU
    config.steps_per_execution = 1

    # Schedule: global batch size; `steps_per_epoch` None is one pass over a
    # finite training split. An epoch is also the unit of the backup a
    # killed run resumes from (Keras's fit resumes at epoch boundaries):
    # for long passes (ImageNet, C4 on a preemptible TPU) set
    # steps_per_epoch to the backup interval; the data stream, the learning
    # rate schedule and so the trained weights do not depend on it.
    config.batch_size = 64
    config.epochs = 10
    config.steps_per_epoch = config_dict.placeholder(int)
    # Start from the weights of a trained model of this architecture: a
    # finished run's workdir (its model.keras) or a .keras file. With
    # model.k "auto:<mean k>", k per MLP is allocated on it (dense) first,
    # as config.eval.allocate says (examples, step, by), then fine-tuned; a
    # dense run whose own allocation evaluation did the same gives its k.
    config.init_from = config_dict.placeholder(str)
    # With model.k "auto:<mean k>" and no init_from: first train this many
    # epochs dense, as a run of its own in <workdir>/dense_warmup (this
    # config at k None, without the evaluations a key asks for), and
    # allocate k on that model; then train `epochs` with it.
    config.dense_warmup_epochs = 0

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # adamw | adam | sgd | adafactor
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1e-4  # adamw only
    config.optimizer.beta_2 = 0.999  # adam(w) only
    config.optimizer.momentum = 0.9  # sgd only
    config.optimizer.schedule = "cosine"  # cosine | constant | rsqrt
    config.optimizer.warmup_steps = 100
    config.optimizer.global_clipnorm = 1.0  # 0: none

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 128
    config.eval.every_epochs = 1  # validation inside fit; 0 turns it off
    # Seq2seq: exact match of greedy decoding on this many examples.
    config.eval.generate_examples = 0
    # Images: accuracy and calibration under these input corruptions
    # (topk_sparse.data.corruptions) at these severities; () skips it.
    config.eval.corruptions = ()
    config.eval.severities = (1, 2, 3, 4, 5)
    # Two-stage neuron scoring for batch-1 inference (topk_sparse.scoring),
    # fitted after training to the MLPs' inputs on `examples` training
    # examples and measured on as many test examples: recall of the exact
    # top-k and output cosine per MLP in report.json. Rank 0 skips it;
    # candidates None is 4 k.
    config.eval.two_stage = ml_collections.ConfigDict()
    config.eval.two_stage.rank = 0
    config.eval.two_stage.candidates = config_dict.placeholder(int)
    config.eval.two_stage.examples = 64
    # Choosing k (topk_sparse.allocation), after training: one k per MLP,
    # allocated greedily on `examples` training examples under a mean k of
    # `mean_k`, and the test metrics there beside uniform k = mean_k, both
    # without fine-tuning. 0 skips it; step None is a 32nd of mlp_dim, at
    # most half of mean_k; by "model" keeps the model's outputs close,
    # "mlp" each MLP's own (no model passes: for models of many MLPs).
    config.eval.allocate = ml_collections.ConfigDict()
    config.eval.allocate.mean_k = 0
    config.eval.allocate.step = config_dict.placeholder(int)
    config.eval.allocate.examples = 256
    config.eval.allocate.by = "model"
    # model.fit's verbosity; 0 also leaves out the printed report (it is in
    # report.json and returned).
    config.verbose = 2
    return config


# The dimensions every model takes beside its variant; None: the variant's.
DIMENSIONS = ("width", "depth", "num_heads", "mlp_dim")

# T5's relative position buckets (arXiv 1910.10683, Sec. 2.1): keys of
# every T5 config, so that `--config.model.num_buckets=64` sets them.
T5_POSITIONS = {"num_buckets": 32, "max_distance": 128}


def model(name, k, method="auto", recall_target=0.95, implementation="auto",
          **architecture):
    """`config.model`: the model's name, sparsity and architecture keys:
    every argument of the model a user may set (what the data decides,
    sizes and vocabulary, is not a key).

    The `DIMENSIONS` are keys whether or not `architecture` sets them, so
    that `--config.model.mlp_dim=512` overrides the variant's (as in
    big_vision). `k` is typed `object`, so that `--config.model.k=None`
    (the dense ReLU baseline) parses as well as an int.
    """
    section = ml_collections.ConfigDict({"name": name})
    for dimension in DIMENSIONS:
        section[dimension] = config_dict.placeholder(int)
    if name == "vit":
        section.patch_size = config_dict.placeholder(int)  # the variant's
    if name == "t5":
        section.update(T5_POSITIONS)
    section.update(architecture)
    section.k = config_dict.placeholder(object)
    section.k = k
    section.method = method  # one of topk_sparse.ops.METHOD_NAMES
    section.recall_target = recall_target  # of "approx"
    # topk_sparse.ops.IMPLEMENTATIONS: masked, gather or auto (per call).
    section.implementation = implementation
    return section


def t5_optimizer():
    """`config.optimizer` of T5's pretraining (arXiv 1910.10683, Sec.
    3.1.2): Adafactor at 1/sqrt(max(step, 10^4)), no clipping."""
    section = base_config().optimizer
    section.name = "adafactor"
    section.learning_rate = 0.01
    section.schedule = "rsqrt"
    section.warmup_steps = 10_000
    section.global_clipnorm = 0.0
    return section


def runlocal(config, steps_per_epoch=3, batch_size=None):
    """Shrinks `config` in place to a seconds-long smoke test on a CPU."""
    config.strategy = "cpu"
    config.mixed_precision = "float32"
    config.steps_per_execution = 1
    config.epochs = 2
    config.steps_per_epoch = steps_per_epoch
    config.optimizer.warmup_steps = 1
    config.eval.every_epochs = 1
    if batch_size:
        config.batch_size = config.eval.batch_size = batch_size
    if "shuffle_buffer" in config.data:
        config.data.shuffle_buffer = 16
    if config.eval.generate_examples:
        config.eval.generate_examples = 16
    if config.eval.corruptions:
        config.eval.severities = (1, 5)
    return config
