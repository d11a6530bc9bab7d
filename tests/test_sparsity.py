"""Sparsity metrics in topk_sparse.sparsity: counts, and NaN tokens skipped."""

import numpy as np
import pytest

from tests import backend
from tests.backend import normal, numpy
from topk_sparse import ops
from topk_sparse.sparsity import NonzeroFraction, TopKRecall

N, K = 512, 8


def with_nan_tokens():
    """`(clean, x)`, `[6, N]`: `x` is `clean` with two NaN tokens added
    (rows 1 and 4: a +NaN, and two -NaN one of them at position 0)."""
    clean = normal([4, N], seed=(13, 1))
    x = np.insert(clean, [1, 3], normal([2, N], seed=(13, 2)), axis=0)
    x[1, 300] = np.nan
    x[4, [0, 17]] = -np.nan
    return clean, x


def state(metric):
    return [numpy(v) for v in metric.variables]


@pytest.mark.parametrize("mode", backend.MODES)
@pytest.mark.parametrize("method", sorted(ops.METHODS))
def test_nan_tokens_are_skipped(method, mode):
    clean, x = with_nan_tokens()
    metrics = {}
    for name, rows in (("clean", clean), ("nan", x)):
        # Keras metrics create their variables eagerly, before the updates.
        for kind in ("masked", "gathered"):
            metrics[name, kind] = NonzeroFraction(N)
        for kind in ("recall", "recall_gathered"):
            metrics[name, kind] = TopKRecall(K)
        mine = [metrics[name, kind] for kind in (
            "masked", "gathered", "recall", "recall_gathered")]

        def update(x, mine=mine):
            masked = ops.topk_mask(x, K, method, 0.9)
            values, indices = ops.topk_activations(x, K, method, 0.9)
            mine[0].update_state(masked)
            mine[1].update_from_topk(values, indices)
            mine[2].update_state(x, masked)
            mine[3].update_from_topk(x, values, indices)

        backend.compiled_with_state(
            update, [v for m in mine for v in m.variables], mode)(rows)
    for kind in ("masked", "gathered", "recall", "recall_gathered"):
        for got, want in zip(state(metrics["nan", kind]),
                             state(metrics["clean", kind])):
            np.testing.assert_array_equal(got, want, err_msg=kind)
    nonzero = metrics["nan", "gathered"]
    assert float(nonzero.token_count) == 4
    assert float(nonzero.result()) > 0 and float(nonzero.dead_fraction()) < 1
    assert 0 < float(metrics["nan", "recall"].result()) <= 1


def test_nonzero_fraction_counts():
    metric = NonzeroFraction(mlp_dim=4)
    metric.update_state(np.array([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0],
                                  [np.nan, 0.0, 1.0, 0.0]], "float32"))
    assert float(metric.result()) == 3 / 8
    assert float(metric.token_count) == 2
    np.testing.assert_array_equal(numpy(metric.neuron_fire_count),
                                  [1, 0, 0, 2])
    assert float(metric.dead_fraction()) == 0.5
    fractions, tokens = metric.token_nonzero_fractions()
    np.testing.assert_array_equal(fractions, [0.25, 0.5])
    np.testing.assert_array_equal(tokens, [1, 1])
    # +inf is a (very) positive activation, not a NaN.
    metric.update_from_topk(np.array([[np.inf, 1.0]], "float32"),
                            np.array([[1, 2]]))
    assert float(metric.token_count) == 3
    np.testing.assert_array_equal(numpy(metric.neuron_fire_count),
                                  [1, 1, 1, 2])
