"""TopKActivation and SparseMLP: the layer checks, equivalence of the masked
and gathered paths, the exposed sparsity, and argument validation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import topk_sparse
from tests.layer_checks import _compile, _data, _model, check_layer
from topk_sparse import SparseMLP, TopKActivation, ops
from tests.test_ops import reference_topk_mask


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
    np.testing.assert_array_equal(layer(x), np.maximum(x, 0))
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
    call = tf.function(layer, input_signature=[
        tf.TensorSpec(shape, tf.float32)])
    np.testing.assert_allclose(call(x), reference(x), rtol=1e-5, atol=1e-5)
    assert bool(calls) == gathers


def test_masked_and_gather_paths_agree():
    x = np.random.default_rng(1).normal(size=(3, 7, 32)).astype("float32")
    masked = SparseMLP(128, k=9, implementation="masked")
    gather = SparseMLP.from_config(
        {**masked.get_config(), "implementation": "gather"})
    masked.build(x.shape)
    gather.build(x.shape)
    gather.set_weights(masked.get_weights())
    np.testing.assert_allclose(gather(x), masked(x), rtol=1e-5, atol=1e-5)
    assert float(gather.nonzero_fraction.result()) == float(masked.nonzero_fraction.result())
    for name in ("neuron_fire_count", "tokens_by_nonzero_count"):
        np.testing.assert_array_equal(
            getattr(gather.nonzero_fraction, name).numpy(),
            getattr(masked.nonzero_fraction, name).numpy())
    # Gradients agree too.
    grads = []
    for layer in (masked, gather):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        grads.append([tf.convert_to_tensor(g).numpy()
                      for g in tape.gradient(loss, layer.trainable_weights)])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_sparse_mlp_matches_reference():
    x = np.random.default_rng(2).normal(size=(4, 16)).astype("float32")
    mlp = SparseMLP(64, k=5, method="exact")
    out = mlp(x).numpy()
    w1, b1, w2, b2 = (w.numpy() for w in (
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
    assert float(mlp.nonzero_fraction.token_count.numpy()) == 8
    mlp.nonzero_fraction.reset_state()
    assert float(mlp.nonzero_fraction.result()) == 0.0
    assert SparseMLP(8, track_sparsity=False).get_config()["track_sparsity"] \
        is False


def test_untracked_layer_has_no_metric():
    model = _compile(_model(SparseMLP, {"mlp_dim": 8, "k": 2,
                                        "track_sparsity": False}, (3, 4)))
    x, y = _data((3, 4))
    history = model.fit(x, y, epochs=1, verbose=0)
    assert list(history.history) == ["loss"]


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
    hidden = x.reshape(-1, 16) @ mlp.intermediate_kernel.numpy() \
        + mlp.intermediate_bias.numpy()
    kept = ops.topk_mask(hidden, 8, method, 0.8).numpy() > 0
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
