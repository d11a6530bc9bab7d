"""What ViT and T5 share as models: the variant table lookup, each MLP's
`k`, and the constructor-arguments config that a `.keras` file stores."""

import collections.abc

import keras

from topk_sparse import checks
from topk_sparse import ops as topk_ops


def resolve_variant(table, variant, model, **explicit):
    """The architecture of `variant` from `table`, with `explicit` overrides.

    Every key of the table's entries must end up set: from the variant, or
    from an explicit (not None) argument.
    """
    if variant is not None and variant not in table:
        raise ValueError(
            f"Unknown {model} variant {variant!r}: choose one of "
            f"{sorted(table)}, or give the dimensions explicitly.")
    resolved = dict(table[variant]) if variant is not None else {}
    resolved.update({k: v for k, v in explicit.items() if v is not None})
    missing = [k for k in explicit if resolved.get(k) is None]
    if missing:
        raise ValueError(
            f"{model} needs a variant (one of {sorted(table)}) or all of "
            f"{list(explicit)}; missing {missing}.")
    return {name: checks.positive_int(value, name)
            for name, value in resolved.items()}


def k_per_mlp(k, widths):
    """Each MLP's `k`, checked: the one reading of a `k` argument, for our
    models, keras-hub backbones and `topk_sparse.allocation`.

    Args:
      k: None or an int: the same for every MLP; a list or tuple with one
        value per MLP in layer order; or a mapping `{MLP name: k}` that
        names every MLP. A value None is a dense ReLU MLP.
      widths: `{MLP name: hidden width}`, in layer order.

    Returns:
      `{MLP name: k or None}` in layer order, each `k` an int in
      `[1, width]`.

    Raises:
      ValueError: a list of another length, a mapping with an unknown or a
        missing name (the message lists the MLPs), a value that is not an
        int in `[1, width]`.
    """
    names = list(widths)
    values = dict(zip(names, _split(k, names)))
    return {name: None if value is None else topk_ops.validate_k(
        value, widths[name]) for name, value in values.items()}


def _split(k, names):
    """`k_per_mlp`'s values in the order of `names`, unchecked."""
    layers = ", ".join(names)
    if isinstance(k, collections.abc.Mapping):
        unknown = [name for name in k if name not in names]
        missing = [name for name in names if name not in k]
        if unknown or missing:
            problem = (f"names no MLP {unknown}" if unknown
                       else f"misses {missing}")
            raise ValueError(
                f"k {problem}: a mapping gives every MLP its k (None for "
                f"dense), by layer name: {layers}.")
        return [k[name] for name in names]
    if isinstance(k, (list, tuple)):
        if len(k) != len(names):
            raise ValueError(
                f"k has {len(k)} values for {len(names)} MLPs: give one "
                f"per MLP, in layer order: {layers}.")
        return list(k)
    return [k] * len(names)


def k_config(k):
    """`k` as a model's config keeps it, the value a `.keras` file gives
    back: a tuple as a list, a mapping as a dict."""
    if isinstance(k, collections.abc.Mapping):
        return dict(k)
    return list(k) if isinstance(k, tuple) else k


class ArgumentsConfig:
    """A functional model's config: its constructor arguments.

    `_keep_arguments(**arguments)` stores each as an attribute and
    `get_config` returns them with the base model's name, trainable flag
    and dtype policy; `from_config` calls the constructor with them.
    """

    def _keep_arguments(self, **arguments):
        self._arguments = list(arguments)
        for name, value in arguments.items():
            setattr(self, name, value)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            **{name: getattr(self, name) for name in self._arguments},
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
