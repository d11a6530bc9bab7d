"""Argument checks shared by every module: one rule, one message.

An integral argument accepts any integral number (`int`, `np.int64`, a 0-d
integer array), never a `bool` or a float, and is returned as a Python
`int`, so that configs and layer configs serialize it plainly.
"""

import contextlib
import numbers

import numpy as np


class ConfigError(ValueError):
    """A training config that cannot run, said in one line; the trainer
    binaries print it without a traceback."""


@contextlib.contextmanager
def config_errors(section):
    """Reports a `ValueError` or `TypeError` raised while reading `section`
    of a config as a `ConfigError` naming it."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{section}: {e}") from e


def is_number(value):
    """Whether `value` is a real number (numpy's included), not a bool:
    what a float argument accepts before its own range check."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def integer(value, name):
    """`value` as an int if it is an integral number (not a bool), else
    raises `ValueError` naming `name`."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or \
            not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}.")
    return int(value)


def positive_int(value, name, upper=None, error=ValueError):
    """`value` as an int if it is an integral number in `[1, upper]`
    (`upper` None: no bound), else raises `error` naming `name`."""
    bound = "" if upper is None else f" no larger than {upper}"
    try:
        number = integer(value, name)
    except ValueError:
        number = None
    if number is None or number < 1 or (upper is not None and
                                        number > upper):
        raise error(
            f"{name} must be a positive int{bound}, got {value!r}.")
    return number


def int_in_range(value, name, low, high, why=""):
    """`value` as an int if it is an integral number in `[low, high]`,
    else raises `ValueError` naming `name`, the range and `why` (a reason
    for the range, e.g. " (the kernel's smaller side)")."""
    try:
        number = integer(value, name)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise ValueError(
            f"{name} must be an int in [{low}, {high}]{why}, got {value!r}.")
    return number
