"""TopKActivation and SparseMLP in training: the layer checks (fit, mixed
precision, `.keras`, data parallel) and the sparsity that reaches `fit`'s
History.

TensorFlow backend only, for now: Keras's JAX trainer calls a model's
layers with only their weights passed through the trace
(`JAXTrainer.compute_loss_and_updates` -> `stateless_call`), so a metric
that a layer updates in `call` reads a variable the trainer has taken out
("'NoneType' object is not callable"). Lifting that is the next step of
the backends issue; tests/test_layers.py runs on both backends.
"""

import numpy as np
import pytest

from tests.backend import numpy
from tests.layer_checks import _compile, _data, _model, check_layer
from topk_sparse import SparseMLP, TopKActivation


@pytest.mark.parametrize("method", ["exact", "approx", "auto", "statistical"])
def test_topk_activation(method, tmp_path):
    kwargs = {"k": 3, "method": method}
    mirrored, history = check_layer(TopKActivation, kwargs, (5, 12), (5, 12),
                                    0, tmp_path)
    # The layer's nonzero fraction reaches the History, under MirroredStrategy.
    fraction = history.history["under_test/nonzero_fraction"][0]
    # "statistical" keeps about k: a cutoff, not a count.
    assert 0 < fraction <= (0.5 if method == "statistical" else 3 / 12)
    # Approximate methods report their recall (12 entries: "approx" is
    # exact, one bin per entry), under MirroredStrategy too.
    recall = history.history.get("under_test/topk_recall")
    assert (recall is not None) == (method in ("approx", "statistical"))
    if method == "approx":
        assert recall == [1.0]
    elif recall:
        assert 0 < recall[0] <= 1
    sparsity = mirrored.get_layer("under_test").nonzero_fraction
    assert float(sparsity.token_count.numpy()) == 10 * 5


def test_topk_activation_without_k_is_a_measured_relu(tmp_path):
    _, history = check_layer(TopKActivation, {"k": None}, (5, 12), (5, 12),
                             0, tmp_path)
    assert 0 < history.history["under_test/nonzero_fraction"][0] < 1
    layer = TopKActivation(None)
    x = np.random.default_rng(0).normal(size=(4, 12)).astype("float32")
    np.testing.assert_array_equal(numpy(layer(x)), np.maximum(x, 0))
    assert float(layer.nonzero_fraction.result()) == pytest.approx(
        np.mean(x > 0))
    assert layer.recall is None


@pytest.mark.parametrize("kwargs", [
    {"k": None},
    {"k": 4, "method": "exact"},
    {"k": 4, "method": "approx", "recall_target": 0.9},
    {"k": 4, "implementation": "gather"},
    {"k": 4, "method": "statistical", "implementation": "gather"},
    {"k": 4, "output_dim": 6, "use_bias": False},
], ids=["dense", "exact", "approx", "gather", "statistical", "no_bias"])
def test_sparse_mlp(kwargs, tmp_path):
    kwargs = {"mlp_dim": 16, **kwargs}
    out_dim = kwargs.get("output_dim", 8)
    weights = 4 if kwargs.get("use_bias", True) else 2
    mirrored, history = check_layer(SparseMLP, kwargs, (5, 8), (5, out_dim),
                                    weights, tmp_path)
    fraction = history.history["under_test/nonzero_fraction"][0]
    assert 0 < fraction <= (kwargs["k"] or 16) / 16
    sparsity = mirrored.get_layer("under_test").nonzero_fraction
    assert float(sparsity.token_count.numpy()) == 10 * 5
    # The per-token distribution adds up over replicas too.
    fractions, tokens = sparsity.token_nonzero_fractions()
    assert tokens.sum() == 10 * 5
    np.testing.assert_allclose(fractions @ tokens / 50, fraction, rtol=1e-5)


def test_untracked_layer_has_no_metric():
    model = _compile(_model(SparseMLP, {"mlp_dim": 8, "k": 2,
                                        "track_sparsity": False}, (3, 4)))
    x, y = _data((3, 4))
    history = model.fit(x, y, epochs=1, verbose=0)
    assert list(history.history) == ["loss"]
