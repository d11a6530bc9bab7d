"""What ViT and T5 share as models: the variant table lookup and the
constructor-arguments config that a `.keras` file stores."""

import keras

from topk_sparse import checks


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
