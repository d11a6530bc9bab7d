"""Choosing k: measure what each MLP of a model needs, then give each its own.

Layers of one model differ widely in how many activations their tokens use
(T5-Base: 1.1% to 12.0% nonzero by layer, *The Lazy Neuron Phenomenon*),
so one `k` for all is too many for some MLPs and too few for others. Here:

- `measure(model, batches)`: runs the model on a few batches with its MLPs
  dense (as `k=None`) and gives, per MLP, a `Profile`: the active units
  per token (mean, quantiles) and, for any `k`, how much of the MLP's output
  the top-k of each token carries (`Profile.curve`, `Profile.needed_k`);
- `allocate(model, batches, mean_k)`: one `k` per MLP, their mean at most
  `mean_k` (or the bytes a decoding step's MLPs read at most `max_bytes`),
  chosen greedily in the spirit of TEAL (Liu et al., 2024): from exact
  (each MLP's `k` at its most active token), lower by `step` the `k` of
  the MLP whose lowering changes the model's outputs (or the MLP's own)
  least on `batches`, until the budget is met;
- `uniform(model, mean_k)`: the baseline, the same `k` everywhere;
- `decode_bytes(model, k)`: the bytes of MLP weights a decoding step reads
  at `k` on the gathered path (what `max_bytes` bounds);
- `output_distance(model, batches, k)`: how far the outputs move at `k`
  (what `allocate` minimizes);
- `k_applied(model, k)`: runs the model with other `k`s, restored on exit.

The models are ours (`ViT`, `T5`: their `SparseMLP`s) or keras-hub
backbones made Top-k by `integrations.keras_hub.sparsify` (their
`TopKActivation`s: there an MLP's output is its activation's); see
`sparsity.sparse_mlps`. The `k` mappings are by MLP name, what the models
and `sparsify` take (`ViT(k={...})`, `sparsify(backbone, k={...})`) and save.

Example:
>>> model = topk_sparse.models.ViT("micro", image_size=16, num_classes=10)
>>> batches = [np.random.default_rng(0).normal(size=(8, 16, 16, 3))]
>>> profiles = measure(model, batches)
>>> profiles["encoder_block_0_mlp"].tokens
136
>>> chosen = allocate(model, batches, mean_k=32)
>>> sum(chosen.k.values()) <= 2 * 32
True
"""

import contextlib
import dataclasses
import math

import keras
from keras import ops
import numpy as np

from topk_sparse import backend, checks, scoring
from topk_sparse import ops as topk_ops
from topk_sparse.layers import SparseMLP
from topk_sparse.models.common import k_per_mlp
from topk_sparse.sparsity import metrics_restored, sparse_mlps


QUANTILES = (0.1, 0.5, 0.9, 0.99)
"""The quantiles of active units per token a `Profile` summarizes."""

CHUNK = 1024
"""Tokens per call of a `Profile`'s compiled curve."""


def _mlps(model):
    """`sparsity.sparse_mlps(model)`, the MLPs whose `k` is chosen here, by
    name in layer order; raises where there are none."""
    found = sparse_mlps(model)
    if not found:
        raise ValueError(
            f"Model {model.name!r} has no MLP to choose k for: build it from "
            f"topk_sparse.models (ViT, T5), or make a keras-hub backbone "
            f"one with topk_sparse.integrations.keras_hub.sparsify.")
    return found


@contextlib.contextmanager
def k_applied(model, k):
    """Runs `model`'s MLPs with `k` inside the context, their own after.

    For eager calls and for the `fit` / `evaluate` / `predict` functions
    compiled inside (the model's compiled functions are dropped on entry
    and exit, since `k` is fixed when a function is traced). Two-stage
    scorers (`topk_sparse.scoring`, calibrated for the MLP's own `k`) are
    set aside meanwhile. A `.keras` file saved inside still holds the
    model's own `k`: build the model with `k` to keep it.

    Args:
      model: a model with Top-k MLPs (`sparsity.sparse_mlps`).
      k: what the models take: None or an int for all, a list in layer
        order, or a mapping `{MLP name: k}` (None: dense).
    """
    mlps = _mlps(model)
    ks = _validated(mlps, k)
    saved = {name: (mlp.k, mlp.scorer) for name, mlp in mlps.items()}
    for mlp, value in zip(mlps.values(), ks.values()):
        mlp.k, mlp.scorer = value, None
    _drop_compiled(model)
    try:
        yield
    finally:
        for name, mlp in mlps.items():
            mlp.k, mlp.scorer = saved[name]
        _drop_compiled(model)


def _validated(mlps, k):
    """`{MLP name: k or None}` from what the models take as `k`."""
    return k_per_mlp(k, {name: mlp.mlp_dim for name, mlp in mlps.items()})


def _drop_compiled(model):
    for name in ("train_function", "test_function", "predict_function"):
        if hasattr(model, name):
            setattr(model, name, None)


@dataclasses.dataclass
class Profile:
    """What one MLP's tokens need, measured dense (`measure`).

    Attributes:
      mlp_dim: the MLP's hidden width.
      tokens: how many tokens were measured.
      active: int array `[tokens]`, each token's positive activations.
    The MLP's inputs are kept, to give `curve` at any `k`.
    """
    mlp_dim: int
    tokens: int
    active: np.ndarray
    _mlp: object = dataclasses.field(repr=False)
    _inputs: np.ndarray = dataclasses.field(repr=False)
    _curve: dict = dataclasses.field(default_factory=dict, repr=False)
    _token_curve: object = dataclasses.field(default=None, repr=False)

    def curve(self, k):
        """`(cosine, share)` of the MLP's output with the top-`k` of each
        token against all its activations, means over tokens.

        `cosine`: of the two outputs; `share`: `1 - |y_k - y|² / |y|²`,
        the share of the output's energy the top-k carries (1: exact; can
        be below 0). The output bias is left out (the same in both); a
        token with at most `k` active units counts as 1 in both.
        """
        k = topk_ops.validate_k(k, self.mlp_dim)
        if k not in self._curve:
            if self._token_curve is None:
                self._token_curve = _token_curve(self._mlp)
            k_tensor = ops.convert_to_tensor(k, "int32")
            per_token = [self._token_curve(ops.convert_to_tensor(
                self._inputs[start:start + CHUNK]), k_tensor)
                         for start in range(0, self.tokens, CHUNK)]
            self._curve[k] = tuple(
                float(np.mean(np.concatenate([ops.convert_to_numpy(
                    part[i]) for part in per_token]))) for i in range(2))
        return self._curve[k]

    def needed_k(self, cosine=None, share=None):
        """The least `k` whose `curve` reaches `cosine` (and `share`), found
        by bisection up to the most units a token has active, where the
        curve is exact (it rises with `k` in practice: each further `k`
        adds the largest remaining activation).

        Example: `profile.needed_k(cosine=0.99)`.
        """
        if cosine is None and share is None:
            raise ValueError("needed_k needs a target: cosine=, share= or "
                             "both (e.g. cosine=0.99).")

        def reaches(k):
            got_cosine, got_share = self.curve(k)
            return ((cosine is None or got_cosine >= cosine) and
                    (share is None or got_share >= share))

        low, high = 1, max(1, min(self.mlp_dim, int(self.active.max())))
        while low < high:
            middle = (low + high) // 2
            if reaches(middle):
                high = middle
            else:
                low = middle + 1
        return low

    def summary(self, ks=None, cosine=0.99):
        """A JSON-ready dict: active units per token (mean, max, the
        `QUANTILES`), `curve` at `ks` (default: the powers of two up to
        `mlp_dim`; keys are str, as in JSON) and `needed_k(cosine=cosine)`.
        """
        ks = ks or [2 ** i for i in range(int(math.log2(self.mlp_dim)) + 1)]
        return {
            "mlp_dim": self.mlp_dim, "tokens": self.tokens,
            "active_mean": float(self.active.mean()),
            "active_max": int(self.active.max()),
            **{f"active_p{round(q * 100)}": float(np.quantile(self.active, q))
               for q in QUANTILES},
            "curve": {str(k): dict(zip(("cosine", "share"), self.curve(k)))
                      for k in ks},
            "needed_k": {f"cosine>={cosine}": self.needed_k(cosine=cosine)},
        }


def _hidden(mlp, inputs):
    """What the MLP's Top-k selects from (after ReLU), float32:
    `relu(x W1 + b1)` of a `SparseMLP`, `relu(x)` of a `TopKActivation`."""
    inputs = ops.cast(inputs, "float32")
    if isinstance(mlp, SparseMLP):
        inputs = mlp.pre_activations(inputs)
    return ops.relu(inputs)


def _kth_largest(activations, k):
    """Each token's `k`-th largest of `activations` `[tokens, n]` (float32,
    non-negative), `[tokens, 1]`, for a traced `k`: a bisection over the
    float32 bit patterns, which order non-negative floats as their values
    do (31 halvings of [0, inf]; a sort was 15 times slower on XLA's CPU)."""
    bits = ops.view(activations, "int32")
    lowest = ops.zeros_like(bits[:, :1])

    def halve(_, bounds):
        low, high = bounds  # at least k of a token's bits >= its low
        middle = low + (high - low + 1) // 2
        enough = ops.sum(ops.cast(bits >= middle, "int32"), -1,
                          keepdims=True) >= k
        return (ops.where(enough, middle, low),
                ops.where(enough, high, middle - 1))
    low, _ = ops.fori_loop(0, 31, halve, (lowest, lowest + 0x7F800000))
    return ops.view(low, "float32")


def _kept(activations, k):
    """`activations` `[tokens, n]` (float32, non-negative) with all but
    each token's `k` largest zeroed, ties at the `k`-th value going to the
    lower index (what an exact top-k keeps). Every shape is the same at any
    `k` (no gather of `k` rows), so one compilation serves every `k`."""
    kth = _kth_largest(activations, k)
    above = activations > kth
    tied = ops.cast(activations == kth, "int32")
    room = k - ops.sum(ops.cast(above, "int32"), -1, keepdims=True)
    keep = ops.logical_or(above, ops.logical_and(
        tied > 0, ops.cumsum(tied, axis=-1) <= room))
    return ops.where(keep, activations, 0.0)


def _outputs(mlp, inputs, k):
    """`(dense, top-k)`: the MLP's output (a `TopKActivation`'s is its
    activation's) with all its activations and with the `k` largest per
    token, float32; the output bias left out."""
    activations = _hidden(mlp, inputs)
    kept = _kept(activations, k)
    if isinstance(mlp, SparseMLP):
        kernel = ops.cast(mlp.output_kernel, "float32")
        return (topk_ops.project(activations, kernel),
                topk_ops.project(kept, kernel))
    activation = mlp._activation or (lambda x: x)
    inputs = ops.cast(inputs, "float32")
    if mlp.activation != "relu":
        kept = activation(kept)
    return activation(inputs), kept


def _token_curve(mlp):
    """`(part [tokens, d], k) -> (cosine, share)` of each token of `part`
    (`Profile.curve` before the mean), compiled (`backend.compiled`; `k` a
    traced int32 scalar, so one compilation serves every `k`), in float32
    whatever the model's precision."""
    # Where a token has at most k active units, the top-k output is the
    # dense one (up to rounding), unless an activation other than ReLU
    # also passes negative inputs.
    exact_below_k = isinstance(mlp, SparseMLP) or mlp.activation == "relu"

    def curve(part, k):
        dense, kept = _outputs(mlp, part, k)
        energy = ops.sum(dense * dense, -1)
        exact = energy == 0
        if exact_below_k:
            active = ops.sum(ops.cast(_hidden(mlp, part) > 0, "int32"), -1)
            exact = ops.logical_or(exact, active <= k)
        cosine = ops.sum(kept * dense, -1) / ops.maximum(
            ops.norm(kept, axis=-1) * ops.norm(dense, axis=-1), 1e-30)
        share = 1 - ops.sum((kept - dense) ** 2, -1) / ops.maximum(
            energy, 1e-30)
        return ops.where(exact, 1.0, cosine), ops.where(exact, 1.0, share)
    return backend.compiled(curve, mlp)


def measure(model, batches):
    """Each MLP's `Profile` on `batches`, its MLPs dense meanwhile.

    The model runs eagerly, in inference mode, with every MLP at `k=None`
    (ReLU: all positive activations); its outputs, `k`s and sparsity
    metrics are as they were after.

    Args:
      model: a model with Top-k MLPs (`sparsity.sparse_mlps`):
        `topk_sparse.models.ViT`, `T5`, or a keras-hub backbone from
        `integrations.keras_hub.sparsify` (its `k=None` copy measures the
        backbone as it is).
      batches: iterable of model inputs (a few batches, thousands of
        tokens).

    Returns:
      `{MLP name: Profile}`, in layer order.
    """
    mlps = _mlps(model)
    with k_applied(model, None), metrics_restored(model), \
            scoring.recording_inputs(mlps) as records:
        for batch in batches:
            model(batch, training=False)
    if not all(records.values()):
        raise ValueError("measure got no batches: pass a few batches of "
                         "model inputs.")
    profiles = {}
    for name, mlp in mlps.items():
        inputs = np.concatenate(records[name])
        active = np.concatenate([ops.convert_to_numpy(ops.sum(ops.cast(
            _hidden(mlp, part) > 0, "int32"), -1)) for part in records[name]])
        profiles[name] = Profile(mlp.mlp_dim, len(inputs), active, mlp,
                                 inputs)
    return profiles


def relative_error(outputs, reference):
    """`|outputs - reference|² / |reference|²` over every output (a model's
    outputs may be a tree): `allocate`'s default distance."""
    error = energy = 0.0
    for got, want in zip(keras.tree.flatten(outputs),
                         keras.tree.flatten(reference)):
        got = np.asarray(ops.convert_to_numpy(got), np.float64)
        want = np.asarray(ops.convert_to_numpy(want), np.float64)
        error += float(np.sum((got - want) ** 2))
        energy += float(np.sum(want ** 2))
    return error / max(energy, 1e-300)


def _distance(model, batches, reference, k, distance):
    """Mean `distance` over `batches` of the model's outputs at `k` to
    `reference` (its outputs there, as it is)."""
    with k_applied(model, k):
        return float(np.mean([distance(model(batch, training=False), want)
                              for batch, want in zip(batches, reference)]))


def output_distance(model, batches, k, distance=relative_error):
    """How far `model`'s outputs move on `batches` when its MLPs run at `k`
    (mean `distance`, default `relative_error`, to its outputs as it is):
    what `allocate` minimizes, e.g. to compare `uniform` with it on held-out
    batches. The model's metrics are left as they were."""
    batches = list(batches)
    with metrics_restored(model):
        reference = [model(batch, training=False) for batch in batches]
        return _distance(model, batches, reference, k, distance)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What `allocate` chose.

    Attributes:
      k: `{MLP name: k}`, what the models take as `k`.
      mean_k: the mean of `k`.
      distance: what the search minimized, at `k`: the model's output
        distance to its own on the batches (`by="model"`), or the mean
        energy share the MLPs' outputs lost (`by="mlp"`).
      history: one `(mean_k, distance, MLP lowered)` per greedy step.
      profiles: `{MLP name: Profile}`, the `measure` of the batches it
        started from.
    """
    k: dict
    mean_k: float
    distance: float
    history: tuple
    profiles: dict = dataclasses.field(repr=False)


def _validate_budget(mean_k, mlps):
    smallest = min(mlp.mlp_dim for mlp in mlps.values())
    if not checks.is_number(mean_k) or not 1 <= mean_k <= smallest:
        raise ValueError(
            f"mean_k must be a number in [1, {smallest}] (the narrowest "
            f"MLP's width), got {mean_k!r}.")
    return mean_k


def _read_bytes(mlps):
    """`(fixed, {MLP name: bytes per unit of k})` of a decoding step on
    the gathered path: what the MLPs read whatever their `k` (first
    kernels, biases), and the bytes of one row of each second kernel."""
    fixed, row = 0, {}
    for name, mlp in mlps.items():
        if not isinstance(mlp, SparseMLP):
            raise ValueError(
                f"MLP {name!r} is a {type(mlp).__name__}, which multiplies "
                f"its whole second kernel (no gathered path to count the "
                f"bytes of): give a mean_k budget instead.")
        fixed += sum(ops.convert_to_numpy(weight).nbytes for weight in (
            mlp.intermediate_kernel, mlp.intermediate_bias, mlp.output_bias)
            if weight is not None)
        row[name] = ops.convert_to_numpy(
            mlp.output_kernel).nbytes // mlp.mlp_dim
    return fixed, row


def decode_bytes(model, k):
    """The bytes of MLP weights one decoding step (one token) reads on the
    gathered path with its MLPs at `k`: each `SparseMLP` reads its first
    kernel and its biases whole and `k` rows of its second kernel (all of
    them where its `k` is None), at the weights' stored dtype.

    Args:
      model: a model with Top-k MLPs (`sparsity.sparse_mlps`) that are
        `SparseMLP`s (ours; a keras-hub backbone's `TopKActivation`s
        raise: their backbones multiply the whole second kernel).
      k: what the models take: None or an int for all, a list in layer
        order, or a mapping `{MLP name: k}` (None: dense).

    Example: `decode_bytes(model, allocate(model, batches, 64).k)` against
    `decode_bytes(model, 64)`.
    """
    mlps = _mlps(model)
    fixed, row = _read_bytes(mlps)
    return fixed + sum(row[name] * (mlps[name].mlp_dim if value is None
                                    else value)
                       for name, value in _validated(mlps, k).items())


def _budget(mlps, mean_k, max_bytes):
    """`(cost, budget)` of `allocate`: what one unit of each MLP's `k`
    costs, and the most all of them may cost: `mean_k` times the number of
    MLPs at a cost of 1, or `max_bytes` less what the MLPs read whatever
    their `k`, at a row's bytes."""
    if (mean_k is None) == (max_bytes is None):
        raise ValueError(
            f"allocate takes one budget, mean_k= (the mean k over MLPs) or "
            f"max_bytes= (the bytes a decoding step's MLPs read), got "
            f"mean_k={mean_k!r} and max_bytes={max_bytes!r}.")
    if max_bytes is None:
        _validate_budget(mean_k, mlps)
        return dict.fromkeys(mlps, 1), math.floor(mean_k * len(mlps))
    fixed, row = _read_bytes(mlps)
    least = fixed + sum(row.values())
    if not checks.is_number(max_bytes) or max_bytes < least:
        dense = fixed + sum(row[name] * mlp.mlp_dim
                            for name, mlp in mlps.items())
        raise ValueError(
            f"max_bytes must be a number of bytes of at least {least} (every "
            f"MLP at k=1; dense reads {dense}), got {max_bytes!r}.")
    return row, math.floor(max_bytes - fixed)


def uniform(model, mean_k):
    """The same `k` for every MLP, `floor(mean_k)`: the baseline that
    `allocate` must beat at the same budget."""
    mlps = _mlps(model)
    k = int(_validate_budget(mean_k, mlps))
    return {name: k for name in mlps}


BY = ("model", "mlp")
"""What `allocate` keeps close: the model's outputs, or each MLP's own."""


def allocate(model, batches, mean_k=None, step=None, by="model",
             distance=relative_error, max_bytes=None):
    """One `k` per MLP, their mean at most `mean_k` (or what a decoding
    step reads at most `max_bytes`), chosen greedily.

    The start is exact on `batches`: each MLP's own `k` (a Top-k model's),
    or, dense, the most units active in any of its tokens (`measure`),
    rounded up to `step`. Each greedy step lowers by `step` the `k` of
    the MLP whose lowering changes least
    - `by="model"`: the model's outputs (`distance` to its outputs as it
      is, on `batches`): one eager pass over `batches` per MLP and step,
      so keep them few (hundreds of examples) and the model small;
    - `by="mlp"`: the MLP's own output (the mean over MLPs of the energy
      share lost, `1 - Profile.curve(k)[1]`): no model passes after
      `measure`, for models whose many MLPs make the first too slow; it
      does not see how the model's output weighs each MLP.
    The last step lowers only what is left of the budget. Judge the result
    on data held out from `batches`.

    Args:
      model: a model with Top-k MLPs (`sparsity.sparse_mlps`).
      batches: list of model inputs.
      mean_k: number, the budget: the mean `k` over MLPs, in `[1, the
        narrowest MLP's width]`.
      max_bytes: number, the budget instead of `mean_k`: the most bytes
        of MLP weights a decoding step may read on the gathered path
        (`decode_bytes`). Each MLP reads its first kernel whole and a row
        of its second per unit of `k`, so where the MLPs share one output
        width (ours do) this is a mean-`k` budget in other units; where
        they do not, a unit of `k` costs each MLP its own row's bytes.
      step: int or None. How much one greedy step lowers a `k`; None:
        a 32nd of the widest MLP, at most half of the mean `k` the budget
        allows (at least 1), so that the search can still tell MLPs apart
        at small budgets.
      by: one of `BY`. Defaults to "model".
      distance: `(outputs, reference) -> float`, for `by="model"`;
        defaults to `relative_error`.

    Returns:
      An `Allocation`.
    """
    mlps = _mlps(model)
    cost, budget = _budget(mlps, mean_k, max_bytes)
    if by not in BY:
        raise ValueError(f"Unknown by={by!r}: choose one of {BY}.")
    batches = list(batches)
    if not batches:
        raise ValueError("allocate got no batches: pass a few batches of "
                         "model inputs.")
    step = checks.positive_int(step if step is not None else max(1, min(
        max(mlp.mlp_dim for mlp in mlps.values()) // 32,
        budget // sum(cost.values()) // 2)), "step")
    with metrics_restored(model):
        active = measure(model, batches)
        if by == "model":
            reference = [model(batch, training=False) for batch in batches]

        def tried(k):
            if by == "mlp":
                return float(np.mean([1 - active[name].curve(value)[1]
                                      for name, value in k.items()]))
            return _distance(model, batches, reference, k, distance)

        k = {name: mlp.k if mlp.k is not None else max(1, min(
            mlp.mlp_dim, step * math.ceil(active[name].active.max() / step)))
            for name, mlp in mlps.items()}
        history = []
        current = tried(k)
        while (over := sum(cost[name] * value
                           for name, value in k.items()) - budget) > 0:
            lower = {name: max(1, value - min(step, math.ceil(
                over / cost[name]))) for name, value in k.items()
                     if value > 1}
            trials = {name: tried({**k, name: value})
                      for name, value in lower.items()}
            lowered = min(trials, key=trials.get)
            k[lowered] = lower[lowered]
            current = trials[lowered]
            history.append((sum(k.values()) / len(k), current, lowered))
    return Allocation(k, sum(k.values()) / len(k), current, tuple(history),
                      active)
