"""The examples in the docstrings of the modules written in `keras.ops` run
and print what they show, on every backend."""

import doctest
import importlib

import keras
import numpy as np
import pytest

import topk_sparse

MODULES = ("topk_sparse.ops", "topk_sparse.layers", "topk_sparse.sparsity",
           "topk_sparse.models.transformer", "topk_sparse.models.vit",
           "topk_sparse.models.t5", "topk_sparse.scoring",
           "topk_sparse.calibration", "topk_sparse.allocation")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, extraglobs={"keras": keras, "np": np,
                            "topk_sparse": topk_sparse},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
