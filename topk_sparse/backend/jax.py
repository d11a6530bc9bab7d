"""The JAX backend's part (see `topk_sparse.backend`)."""

import jax
import keras
from keras.src.backend.common import stateless_scope
import numpy as np


def approx_max_k(x, k, recall_target):
    return jax.lax.approx_max_k(x, k, recall_target=recall_target)


def on_tpu():
    """True when JAX's default devices are TPUs."""
    return jax.default_backend() == "tpu"


def compiled_by_xla():
    """Always: JAX compiles every computation with XLA."""
    return True


def has_value(variable):
    """Whether `variable` can be read here. Not inside Keras' compiled train
    and test steps when it was not passed in: there Keras has purged the
    values of the model's variables and maps only those of the step
    (`JAXTrainer._purge_model_variables`). Reads Keras' own state (the
    current `StatelessScope`, `Variable._value`), private names, as
    `sparsity` calls `Layer._track_variable`: none other is used."""
    scope = stateless_scope.get_stateless_scope()
    if scope is not None and scope.get_current_value(variable) is not None:
        return True
    return variable._value is not None


def sampling_seed(pair):
    """The key `sample` takes: from `pair` (numpy int64 `[2]`), or from
    Python's entropy when `pair` is None (a new one per call; under
    `jax.jit` it is fixed at trace time: pass a seed)."""
    if pair is None:
        pair = np.random.SeedSequence().generate_state(2)
    return jax.random.wrap_key_data(
        np.asarray(pair, np.uint64).astype(np.uint32))


def sample(logits, seed, step):
    """One token per row of float32 `logits` `[batch, vocab]`, int32
    `[batch]`, from `seed` folded with `step` (stateless)."""
    return jax.random.categorical(jax.random.fold_in(seed, step), logits,
                                  axis=-1).astype("int32")


def while_loop(cond, body, loop_vars, maximum_iterations, model):
    """`jax.lax.while_loop` (`cond` bounds the steps) that carries the
    non-trainable variables of `model` (its layers' metric counts) through
    the loop: `body` runs in a `StatelessScope` over them, and their
    values after the loop are assigned (recorded, inside an outer
    `StatelessScope`). Its other variables are read once, outside."""
    carried = model.non_trainable_variables
    fixed = [(v, v.value) for v in model.trainable_variables]

    def step(state):
        values, loop_vars = state
        with keras.StatelessScope(
                state_mapping=[*fixed, *zip(carried, values)]) as scope:
            loop_vars = body(*loop_vars)
        return [scope.get_current_value(v) for v in carried], tuple(loop_vars)

    values, loop_vars = jax.lax.while_loop(
        lambda state: cond(*state[1]), step,
        ([v.value for v in carried], tuple(loop_vars)))
    for variable, value in zip(carried, values):
        variable.assign(value)
    return loop_vars


def compiled(fn, model):
    """`fn` (which calls `model`) compiled by `jax.jit` over the model's
    variables (`jit_over`)."""
    return jit_over(fn, model.variables)


def jit_over(fn, variables):
    """`fn` compiled by `jax.jit` over Keras `variables`: their values go
    into each call (so it runs on their current values) and their updates
    (a layer's metric counts) come out of it and are assigned, as an eager
    call would, the way Keras's own JAX trainer runs a step. The arguments
    are traced; every other value `fn` needs is static."""
    def pure(values, *args):
        with keras.StatelessScope(
                state_mapping=list(zip(variables, values))) as scope:
            out = fn(*args)
        return out, [scope.get_current_value(v) for v in variables]

    jitted = jax.jit(pure)

    def run(*args):
        out, values = jitted([v.value for v in variables], *args)
        for variable, value in zip(variables, values):
            variable.assign(value)
        return out
    return run


def static_value(x):
    """`x` as numpy where its value is known (not a tracer), else None."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)
