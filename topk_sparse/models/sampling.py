"""How `T5.generate` picks each next token: greedy, or sampled with
temperature, top-k and nucleus (top-p) filtering, from a stateless seed.

`token_chooser(...)` checks the arguments once and returns
`choose(logits [batch, vocab], step) -> int32 [batch]`, written in
`keras.ops`. A seed gives the same tokens on every call of one backend
(eagerly or traced); the two backends' random streams differ, so sampled
tokens do too (greedy tokens do not).
"""

import math

from keras import ops
import numpy as np

from topk_sparse import backend, checks


def token_chooser(temperature, top_k, top_p, seed, vocab_size):
    """`choose(logits, step)` for `T5.generate`'s arguments, checked here
    (see its docstring)."""
    if not checks.is_number(temperature) or \
            not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is "
                         f"greedy), got {temperature!r}.")
    top_k = checks.int_in_range(top_k, "top_k", 0, vocab_size)
    if not checks.is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}.")
    seed = _seed_pair(seed)
    if temperature == 0:
        return lambda logits, step: ops.cast(
            ops.argmax(ops.cast(logits, "float32"), axis=-1), "int32")
    # None: a new seed per call (drawn by a stateful op on TensorFlow, so
    # that each call of a traced `generate` samples anew).
    seed = backend.sampling_seed(seed)

    def choose(logits, step):
        logits = ops.cast(logits, "float32") / temperature
        if top_k:
            kth = ops.min(ops.top_k(logits, top_k)[0], axis=-1,
                          keepdims=True)
            logits = ops.where(logits < kth, -math.inf, logits)
        if top_p < 1:
            ordered = -ops.sort(-logits, axis=-1)  # descending
            probabilities = ops.softmax(ordered, axis=-1)
            before = ops.cumsum(probabilities, axis=-1) - probabilities
            # The least likely token kept: the last one whose more likely
            # tokens hold less than top_p.
            cutoff = ops.min(ops.where(before < top_p, ordered, math.inf),
                             axis=-1, keepdims=True)
            logits = ops.where(logits < cutoff, -math.inf, logits)
        return backend.sample(logits, seed, step)

    return choose


def _seed_pair(seed):
    """`seed` (None, an int or a pair of ints) as a numpy int64 `[2]`, or
    None."""
    if seed is None:
        return None
    try:
        return np.array([checks.integer(seed, "seed"), 0], np.int64)
    except ValueError:
        pass
    pair = np.asarray(seed) if isinstance(seed, (list, tuple, np.ndarray)) \
        else None
    if pair is None or pair.shape != (2,) or \
            not np.issubdtype(pair.dtype, np.integer):
        raise ValueError(f"seed must be None, an int or a pair of ints, got "
                         f"{seed!r}.")
    return pair.astype(np.int64)
