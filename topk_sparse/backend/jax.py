"""The JAX backend's part (see `topk_sparse.backend`)."""

import jax


def approx_max_k(x, k, recall_target):
    return jax.lax.approx_max_k(x, k, recall_target=recall_target)


def on_tpu():
    """True when JAX's default devices are TPUs."""
    return jax.default_backend() == "tpu"


def compiled_by_xla():
    """Always: JAX compiles every computation with XLA."""
    return True
