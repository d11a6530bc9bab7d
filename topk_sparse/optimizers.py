"""Optimizers and learning-rate schedules from `config.optimizer`.

`make(config.optimizer, total_steps)`: AdamW, Adam, SGD with Nesterov
momentum or Adafactor, after a linear warmup, with cosine decay, a constant
rate or T5's inverse square root (`RsqrtSchedule`).
"""

import keras

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
SCHEDULES = ("cosine", "constant", "rsqrt")


def make(opt, total_steps):
    """Optimizer from `config.optimizer`: linear warmup, then the schedule."""
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"Unknown config.optimizer.name {opt.name!r}: "
                         f"choose one of {OPTIMIZERS}.")
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"Unknown config.optimizer.schedule "
                         f"{opt.schedule!r}: choose one of {SCHEDULES}.")
    rate = learning_rate(opt, total_steps)
    clip = {"global_clipnorm": opt.global_clipnorm} \
        if opt.global_clipnorm else {}
    if opt.name == "adafactor":  # T5's optimizer
        return keras.optimizers.Adafactor(rate, **clip)
    if opt.name == "sgd":
        return keras.optimizers.SGD(rate, momentum=opt.momentum,
                                    nesterov=True, **clip)
    if opt.name == "adam":
        return keras.optimizers.Adam(rate, beta_2=opt.beta_2, **clip)
    return keras.optimizers.AdamW(rate, beta_2=opt.beta_2,
                                  weight_decay=opt.weight_decay, **clip)


def learning_rate(opt, total_steps):
    """Linear warmup over `opt.warmup_steps`, then cosine decay to 0 by
    `total_steps` or a constant rate; or T5's `"rsqrt"`."""
    if opt.schedule == "rsqrt":
        return RsqrtSchedule(opt.learning_rate, opt.warmup_steps)
    warmup = min(opt.warmup_steps, total_steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else opt.learning_rate,
        decay_steps=max(total_steps - warmup, 1),
        # alpha=1 ends the decay where it starts: a constant rate.
        alpha=0.0 if opt.schedule == "cosine" else 1.0,
        warmup_target=opt.learning_rate if warmup else None,
        warmup_steps=warmup)


@keras.saving.register_keras_serializable(package="topk_sparse")
class RsqrtSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """T5's schedule: constant for `warmup_steps`, then `1/sqrt(step)`.

    `learning_rate * sqrt(warmup_steps / max(step, warmup_steps))`; T5
    (arXiv 1910.10683, Sec. 3.1.2) uses 0.01 and 10^4 steps, i.e.
    `1/sqrt(max(step, 10^4))`.
    """

    def __init__(self, learning_rate, warmup_steps):
        self.learning_rate = float(learning_rate)
        self.warmup_steps = max(int(warmup_steps), 1)

    def __call__(self, step):
        step = keras.ops.maximum(keras.ops.cast(step, "float32"),
                                 float(self.warmup_steps))
        return self.learning_rate * keras.ops.sqrt(self.warmup_steps / step)

    def get_config(self):
        return {"learning_rate": self.learning_rate,
                "warmup_steps": self.warmup_steps}
