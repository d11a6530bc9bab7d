"""TopKActivation and SparseMLP on every backend: eager, traced and XLA
calls with their metrics, `.keras` files, the masked and gathered paths,
the exposed sparsity, argument validation. In training:
tests/test_layer_training.py."""

import math

import keras
import numpy as np
import pytest

import topk_sparse
from tests import backend
from tests.backend import numpy
from topk_sparse import SparseMLP, TopKActivation, ops
from topk_sparse.sparsity import metric_state
from tests.test_ops import reference_topk_mask


@pytest.mark.parametrize("mode", ["function", "jit"])
@pytest.mark.parametrize("layer", [
    TopKActivation(3), TopKActivation(3, method="statistical"),
    TopKActivation(None), SparseMLP(16, k=4), SparseMLP(16, k=4,
                                                        method="approx"),
    SparseMLP(16, k=4, implementation="gather"), SparseMLP(16)],
    ids=["topk", "topk_statistical", "relu", "mlp", "mlp_approx",
         "mlp_gather", "mlp_dense"])
def test_compiled_calls_give_the_eager_outputs_and_metrics(layer, mode,
                                                           tmp_path):
    layer = layer.__class__.from_config(layer.get_config())  # a fresh one
    x = np.random.default_rng(5).normal(size=(4, 5, 16)).astype("float32")
    eager = numpy(layer(x))
    counts = [numpy(v) for v in metric_state(layer)]
    assert counts and any(c.any() for c in counts)
    compiled = numpy(backend.compiled_call(layer, mode)(x))
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    # The compiled call updated the metrics as a second eager call would.
    for variable, count in zip(metric_state(layer), counts):
        np.testing.assert_allclose(numpy(variable), 2 * count, rtol=1e-6)
    # A .keras file reloads the layer with its weights and outputs.
    inputs = keras.Input((5, 16))
    model = keras.Model(inputs, layer.__class__.from_config(
        layer.get_config())(inputs))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(numpy(loaded(x)), numpy(model(x)), rtol=1e-6)


@pytest.mark.parametrize("k,shape,gathers,method", [
    # hidden 384: a sixth is 64 rows of the output kernel.
    (4, (1, 32), True, "auto"), (4, (1, 16, 32), True, "auto"),
    (4, (17, 32), False, "auto"), (4, (2, 16, 32), False, "auto"),
    (4, (None, 32), False, "auto"), (64, (1, 32), True, "auto"),
    (64, (2, 32), False, "auto"), (4, (1, 32), False, "statistical")])
def test_auto_gathers_only_few_tokens(k, shape, gathers, method,
                                      monkeypatch):
    calls = []
    product = topk_sparse.ops.sparse_mlp_product
    monkeypatch.setattr(topk_sparse.ops, "sparse_mlp_product",
                        lambda *a: calls.append(1) or product(*a))
    layer = SparseMLP(384, k=k, method=method)  # implementation="auto"
    layer.build((None, 32))
    reference = SparseMLP(384, k=k, method=method, implementation="masked")
    reference.build((None, 32))
    reference.set_weights(layer.get_weights())
    static = [d or 5 for d in shape]
    x = np.random.default_rng(0).normal(size=static).astype("float32")
    call = backend.with_unknown_dims(layer, shape)
    np.testing.assert_allclose(numpy(call(x)), numpy(reference(x)),
                               rtol=1e-5, atol=1e-5)
    if backend.BACKEND == "jax" and None in shape:
        # JAX traces with the call's static shape: 5 tokens.
        gathers = math.prod(static[:-1]) * k <= 384 / 6
    assert bool(calls) == gathers


def test_masked_and_gather_paths_agree():
    x = np.random.default_rng(1).normal(size=(3, 7, 32)).astype("float32")
    masked = SparseMLP(128, k=9, implementation="masked")
    gather = SparseMLP.from_config(
        {**masked.get_config(), "implementation": "gather"})
    masked.build(x.shape)
    gather.build(x.shape)
    gather.set_weights(masked.get_weights())
    np.testing.assert_allclose(numpy(gather(x)), numpy(masked(x)),
                               rtol=1e-5, atol=1e-5)
    assert float(gather.nonzero_fraction.result()) == float(masked.nonzero_fraction.result())
    for name in ("neuron_fire_count", "tokens_by_nonzero_count"):
        np.testing.assert_array_equal(
            getattr(gather.nonzero_fraction, name).numpy(),
            getattr(masked.nonzero_fraction, name).numpy())
    # Gradients agree too (with respect to the layer's weights).
    grads = []
    for layer in (masked, gather):
        weights = [v.value for v in layer.trainable_variables]
        state = [v.value for v in layer.non_trainable_variables]

        def loss(weights, layer=layer, state=state):
            out, _ = layer.stateless_call(weights, state, x)
            return keras.ops.sum(out ** 2),

        grads.append([numpy(g) for g in
                      backend.value_and_grad(loss)(weights)[1]])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_sparse_mlp_matches_reference():
    x = np.random.default_rng(2).normal(size=(4, 16)).astype("float32")
    mlp = SparseMLP(64, k=5, method="exact")
    out = numpy(mlp(x))
    w1, b1, w2, b2 = (numpy(w) for w in (
        mlp.intermediate_kernel, mlp.intermediate_bias, mlp.output_kernel,
        mlp.output_bias))
    expected = reference_topk_mask(x @ w1 + b1, 5) @ w2 + b2
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    nonzero = (reference_topk_mask(x @ w1 + b1, 5) > 0).mean()
    assert float(mlp.nonzero_fraction.result()) == pytest.approx(nonzero)


def test_sparsity_metric_accumulates_and_resets():
    mlp = SparseMLP(8, k=None)
    x = np.random.default_rng(3).normal(size=(6, 4)).astype("float32")
    mlp(x)
    mlp(x[:2])
    assert float(mlp.nonzero_fraction.token_count) == 8
    mlp.nonzero_fraction.reset_state()
    assert float(mlp.nonzero_fraction.result()) == 0.0
    assert SparseMLP(8, track_sparsity=False).get_config()["track_sparsity"] \
        is False


def test_top_level_exports():
    assert topk_sparse.TopKActivation is TopKActivation
    assert topk_sparse.SparseMLP is SparseMLP
    assert topk_sparse.ops.topk_mask is not None
    assert topk_sparse.distribute.get_strategy is not None


@pytest.mark.parametrize("kwargs,error,match", [
    ({"mlp_dim": 8, "k": 9}, ValueError, "larger than"),
    ({"mlp_dim": 8, "k": 0}, ValueError, "positive int"),
    ({"mlp_dim": 0}, ValueError, "mlp_dim"),
    ({"mlp_dim": 8, "method": "topk"}, ValueError, "Unknown method"),
    ({"mlp_dim": 8, "implementation": "sparse"}, ValueError,
     "Unknown implementation"),
    ({"mlp_dim": 8, "recall_target": 0.0}, ValueError, "recall_target"),
    ({"mlp_dim": 8, "output_dim": -1}, ValueError, "output_dim"),
])
def test_sparse_mlp_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseMLP(**kwargs)


def test_bad_inputs_fail_at_build():
    with pytest.raises(ValueError, match="larger than"):
        TopKActivation(k=5)(keras.Input((3, 4)))
    with pytest.raises(ValueError, match="known last dimension"):
        TopKActivation(k=2).build((None, None))
    with pytest.raises(ValueError, match="rank >= 2"):
        SparseMLP(8).build((4,))
    with pytest.raises(TypeError, match="floating-point"):
        SparseMLP(8, k=2)(np.ones((2, 4), "int32"))
    with pytest.raises(TypeError, match="floating-point"):
        TopKActivation(k=2)(np.ones((2, 4), "int32"))


@pytest.mark.parametrize("method,implementation", [
    ("approx", "masked"), ("approx", "gather"), ("statistical", "masked"),
    ("statistical", "gather")])
def test_approximate_methods_report_their_recall(method, implementation):
    x = np.random.default_rng(4).normal(size=(2, 40, 16)).astype("float32")
    mlp = SparseMLP(512, k=8, method=method, recall_target=0.8,
                    implementation=implementation)
    out = mlp(x)
    hidden = x.reshape(-1, 16) @ numpy(mlp.intermediate_kernel) \
        + numpy(mlp.intermediate_bias)
    kept = numpy(ops.topk_mask(hidden, 8, method, 0.8)) > 0
    if implementation == "gather":  # keeps at most the k largest of those
        kept = reference_topk_mask(np.where(kept, hidden, 0), 8) > 0
    # numpy: the share of each sampled token's exact top-8 (positive) kept.
    sample = np.maximum(hidden, 0)[:64]
    top = np.argsort(-sample, axis=-1, kind="stable")[:, :8]
    relevant = np.take_along_axis(sample, top, -1) > 0
    hits = relevant & np.take_along_axis(kept[:64], top, -1)
    assert mlp.recall.name == f"{mlp.name}/topk_recall"
    np.testing.assert_allclose(float(mlp.recall.result()),
                               hits.sum() / relevant.sum(), rtol=1e-6)
    assert 0.5 < float(mlp.recall.result()) < 1.0  # 128 bins: really binned
    assert out.shape == (2, 40, 16)
    # Exact selection has nothing to report; the dense MLP neither.
    for layer in (SparseMLP(512, k=8, method="exact"), SparseMLP(512)):
        layer.build((None, 16))
        assert layer.recall is None


@pytest.mark.parametrize("k,activation,expected", [
    (2, "relu", [[3.0, 0.0, 0.0, 5.0]]),
    (2, "gelu", [[2.99595, 0.0, 0.0, 5.0]]),
    (None, "gelu", [[2.99595, -0.158655, 1.954500, 5.0]]),
    (None, None, [[3.0, -1.0, 2.0, 5.0]]),
    (None, "relu", [[3.0, 0.0, 2.0, 5.0]])])
def test_topk_activation_runs_the_models_activation_after_topk(
        k, activation, expected):
    layer = TopKActivation(k, activation=activation, metric_name="mine")
    x = np.array([[3.0, -1.0, 2.0, 5.0]], "float32")
    np.testing.assert_allclose(numpy(layer(x)), expected, rtol=1e-5,
                               atol=1e-5)
    # The metric counts the positive outputs, under the name given.
    assert layer.nonzero_fraction.name == "mine"
    assert float(layer.nonzero_fraction.result()) == pytest.approx(
        np.mean(np.array(expected) > 0))
    assert TopKActivation.from_config(layer.get_config()).get_config() == \
        layer.get_config()
