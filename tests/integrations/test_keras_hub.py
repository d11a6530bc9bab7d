"""Top-k in keras-hub backbones: topk_sparse.integrations.keras_hub.

Runs in the environment of `pip install -e ".[hub,jax]"` (see
`.ci/integrations.sh`), on tiny random-weight backbones: no preset is
downloaded.
"""

import statistics
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
from keras_hub.src.models.gemma3n.gemma3n_text_layers import Gemma3nTextMLP

from topk_sparse import TopKActivation, allocation, ops
from topk_sparse.integrations import keras_hub as hub

# keras-hub 0.32's own T5Backbone warns so when built, sparse or not.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Layer '(self|cross)_attention' \\(of type T5MultiHeadAttention\\) "
    "was passed an input with a mask")

BATCH, SEQ = 2, 6


def _tokens(mask_dtype="int32"):
    rng = np.random.default_rng(0)
    return {"token_ids": rng.integers(1, 20, (BATCH, SEQ), "int32"),
            "padding_mask": np.ones((BATCH, SEQ), mask_dtype)}


def _t5():
    rng = np.random.default_rng(0)
    inputs = {"encoder_token_ids": rng.integers(1, 20, (BATCH, SEQ), "int32"),
              "encoder_padding_mask": np.ones((BATCH, SEQ), "int32"),
              "decoder_token_ids": rng.integers(1, 20, (BATCH, 4), "int32"),
              "decoder_padding_mask": np.ones((BATCH, 4), "int32")}
    # Not gated: the paper's ReLU T5 (T5 1.0).
    return keras_hub.models.T5Backbone(
        vocabulary_size=20, num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, dropout=0.0, use_gated_activation=False), inputs


def _vit():
    images = np.random.default_rng(0).normal(size=(BATCH, 8, 8, 3))
    return keras_hub.models.ViTBackbone(
        image_shape=(8, 8, 3), patch_size=4, num_layers=2, num_heads=2,
        hidden_dim=8, mlp_dim=16), images.astype("float32")


def _gemma():
    # Gemma's gate is intermediate_dim // 2 wide: 16.
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=20, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=32,
        head_dim=4), _tokens()


def _gemma3():
    return keras_hub.models.Gemma3Backbone(
        vocabulary_size=20, image_size=16, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
        head_dim=4), _tokens()


def _gemma3n(activation_sparsity_pattern=(0.95, 0.0)):
    return keras_hub.models.Gemma3nBackbone(
        text_vocab_size=20, text_hidden_size=8, num_hidden_layers=2,
        pad_token_id=0, num_attention_heads=1, num_key_value_heads=1,
        head_dim=8, intermediate_size=[16, 16],
        hidden_activation="gelu_approximate",
        layer_types=["full_attention"] * 2, sliding_window=4,
        rope_theta=10000.0, max_position_embeddings=16,
        vocab_size_per_layer_input=20, hidden_size_per_layer_input=2,
        altup_num_inputs=2, laurel_rank=1,
        activation_sparsity_pattern=list(activation_sparsity_pattern),
    ), _tokens(mask_dtype=bool)


# name: (make, MLP count, MLP width, metric names)
MODELS = {
    "t5": (_t5, 16, [f"transformer_{part}_layer_{i}/nonzero_fraction"
                     for part in ("encoder", "decoder") for i in (0, 1)]),
    "vit": (_vit, 16, [f"vit_encoder/transformer_block_{i}/mlp/"
                       "nonzero_fraction" for i in (1, 2)]),
    "gemma": (_gemma, 16, [f"decoder_block_{i}/nonzero_fraction"
                           for i in (0, 1)]),
    "gemma3": (_gemma3, 16, [f"decoder_block_{i}/nonzero_fraction"
                             for i in (0, 1)]),
    "gemma3n": (_gemma3n, 16, [f"text_model/decoder_block_{i}/mlp/"
                               "nonzero_fraction" for i in (0, 1)]),
}
K = 4


def _output(outputs):
    """One float output of a backbone (a dict for T5 and Gemma3n)."""
    if isinstance(outputs, dict):
        outputs = outputs[sorted(outputs)[0]]
    return keras.ops.convert_to_numpy(outputs)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    keras.utils.set_random_seed(0)
    make, width, names = MODELS[request.param]
    backbone, inputs = make()
    return request.param, backbone, inputs, width, names


def test_importing_topk_sparse_needs_no_keras_hub():
    code = ("import sys, topk_sparse, topk_sparse.integrations; "
            "print(sorted({'keras_hub', 'tf_keras'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_sparsify_keeps_k_per_mlp_and_survives_keras_file(model, tmp_path):
    name, backbone, inputs, width, names = model
    sparse = hub.sparsify(backbone, K)
    assert isinstance(sparse, type(backbone))
    assert type(sparse).__name__ == f"TopK{type(backbone).__name__}"
    outputs = _output(sparse(inputs))
    assert sorted(m.name for m in sparse.metrics) == sorted(names)
    for layer in sparse.topk_activations:
        assert 0 < float(layer.nonzero_fraction.result()) <= K / width
    # Same weights as the dense backbone, other outputs.
    assert len(sparse.weights) == len(backbone.weights)
    for a, b in zip(backbone.weights, sparse.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(outputs, _output(backbone(inputs)))

    path = str(tmp_path / f"{name}.keras")
    sparse.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(sparse)
    assert loaded.get_config()["topk"]["k"] == K
    np.testing.assert_array_equal(_output(loaded(inputs)), outputs)


def _paths(names):
    return [name.removesuffix("/nonzero_fraction") for name in names]


def test_sparsify_takes_one_k_per_mlp(model, tmp_path):
    name, backbone, inputs, width, names = model
    paths = _paths(names)
    ks = [K if i % 2 == 0 else None for i in range(len(paths))]
    sparse = hub.sparsify(backbone, ks)
    assert [layer.k for layer in sparse.topk_activations] == ks
    by_name = hub.sparsify(backbone, dict(zip(paths, ks)))
    np.testing.assert_array_equal(_output(by_name(inputs)),
                                  _output(sparse(inputs)))
    path = str(tmp_path / f"{name}.keras")
    by_name.save(path)
    loaded = keras.saving.load_model(path)
    assert [layer.k for layer in loaded.topk_activations] == ks
    np.testing.assert_array_equal(_output(loaded(inputs)),
                                  _output(sparse(inputs)))
    with pytest.raises(ValueError, match=f"k has 1 values for {len(paths)} "
                                         f"MLPs.*{paths[0]}"):
        hub.sparsify(backbone, [K])
    with pytest.raises(ValueError, match="k names no MLP .*'mlp_9'"):
        hub.sparsify(backbone, {**dict(zip(paths, ks)), "mlp_9": K})


def test_measure_and_allocate_on_a_backbone(model):
    name, backbone, inputs, width, names = model
    measured = hub.sparsify(backbone, None)
    before = _output(measured(inputs))
    profiles = allocation.measure(measured, [inputs])
    np.testing.assert_array_equal(_output(measured(inputs)), before)
    assert list(profiles) == _paths(names)
    for profile in profiles.values():
        assert profile.mlp_dim == width and profile.tokens > 0
        assert 0 < profile.active.mean() <= width
        cosine, share = profile.curve(width // 2)
        assert -1 <= cosine <= 1 and share <= 1
    chosen = allocation.allocate(measured, [inputs], mean_k=K, step=4)
    assert sum(chosen.k.values()) == K * len(names)
    with pytest.raises(ValueError, match="is a TopKActivation, which "
                                         "multiplies its whole second kernel"):
        allocation.allocate(measured, [inputs], max_bytes=10 ** 9)
    allocated = hub.sparsify(backbone, chosen.k)
    assert [layer.k for layer in allocated.topk_activations] == list(
        chosen.k.values())
    # The search ran the allocated backbone: the same outputs.
    np.testing.assert_allclose(
        allocation.output_distance(measured, [inputs], chosen.k),
        chosen.distance, rtol=1e-6)


def test_k_none_only_measures(model):
    name, backbone, inputs, width, names = model
    measured = hub.sparsify(backbone, None)
    np.testing.assert_array_equal(_output(measured(inputs)),
                                  _output(backbone(inputs)))
    fractions = {layer.metric_name: float(layer.nonzero_fraction.result())
                 for layer in measured.topk_activations}
    assert sorted(fractions) == sorted(names)
    assert all(0 < value < 1 for value in fractions.values())
    if name == "gemma3n":
        # Its first MLP keeps about 5% (Gaussian top-k at 0.95), the
        # second has none (its pattern entry is 0): gelu's positive half.
        first, second = (fractions[names[0]], fractions[names[1]])
        assert first < 0.2 < second


@pytest.mark.parametrize("name", ["t5", "gemma3n"])
def test_sparse_backbone_trains_under_xla(name):
    keras.utils.set_random_seed(0)
    make, width, names = MODELS[name]
    backbone, inputs = make()
    sparse = hub.sparsify(backbone, K, method="statistical")
    symbolic = {key: keras.Input(value.shape[1:], dtype=value.dtype,
                                 name=key) for key, value in inputs.items()}
    features = sparse(symbolic)
    features = features[sorted(features)[0]] if isinstance(
        features, dict) else features
    model = keras.Model(symbolic, keras.layers.Dense(3)(features[:, 0]))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(True),
                  jit_compile=True)
    before = [w.numpy() for w in sparse.trainable_weights]
    history = model.fit(inputs, np.arange(BATCH) % 3, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert sorted(key for key in history.history
                  if key.endswith("/nonzero_fraction")) == sorted(names)
    assert any(not np.array_equal(a, b.numpy())
               for a, b in zip(before, sparse.trainable_weights))


def test_sparsify_again_replaces_the_topk():
    backbone, inputs = _t5()
    sparse = hub.sparsify(hub.sparsify(backbone, K), 2, method="exact")
    assert type(sparse) is hub.TopKT5Backbone
    assert sparse.get_config()["topk"] == {
        "k": 2, "method": "exact", "recall_target": 0.95}
    sparse(inputs)
    for layer in sparse.topk_activations:
        assert float(layer.nonzero_fraction.result()) <= 2 / 16


def test_unknown_backbone_and_too_large_k_raise():
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="T5Backbone, ViTBackbone, "
                       "GemmaBackbone, Gemma3Backbone, Gemma3nBackbone"):
        hub.sparsify(other, K)
    backbone, _ = _vit()
    with pytest.raises(ValueError, match="larger than"):
        hub.sparsify(backbone, 17)


def test_gated_t5_applies_topk_before_the_gate_product():
    backbone = keras_hub.models.T5Backbone(
        vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, dropout=0.0, use_gated_activation=True)
    sparse = hub.sparsify(backbone, K)
    layer = sparse.get_layer("transformer_encoder_layer_0")
    x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
    gate = layer.input_projector(x)  # Top-k(relu(.)), before the product
    assert (np.count_nonzero(gate, axis=-1) <= K).all()
    hidden = gate * layer.gate_projector(x)
    assert (np.count_nonzero(hidden, axis=-1) <= K).all()


def test_statistical_keeps_what_gemma3n_gaussian_topk_keeps():
    """Outside reference: keras-hub Gemma3n's own statistical top-k.

    Gemma 3n keeps, per token, the gate entries above `mean + std ·
    Φ⁻¹(s)` (population std) and returns them shifted, `relu(x - cutoff)`;
    `method="statistical"` with `k = n (1 - s)` has the same cutoff and
    keeps `x` itself. Same inputs, same level: the same kept entries.
    """
    n, sparsity = 160, 0.95
    k = round(n * (1 - sparsity))  # 8
    mlp = Gemma3nTextMLP(hidden_size=8, intermediate_size=n,
                         hidden_activation="gelu_approximate",
                         activation_sparsity=sparsity)
    rng = np.random.default_rng(0)
    # Gate pre-activations of 512 tokens, with a per-token offset and
    # scale so that the cutoff is not the same for every row.
    x = (rng.normal(size=(512, n)) * rng.uniform(0.5, 2, (512, 1))
         + rng.normal(0, 0.3, (512, 1))).astype("float32")
    theirs = keras.ops.convert_to_numpy(mlp._gaussian_topk(x))
    ours = keras.ops.convert_to_numpy(
        ops.topk_mask(x, k, method="statistical"))
    kept = ours != 0
    np.testing.assert_array_equal(kept, theirs > 0)
    # Both keep about k, as the level says, and ours is unshifted.
    assert abs(kept.sum(axis=1).mean() - k) < 1
    np.testing.assert_array_equal(ours[kept], x[kept])
    cutoff = keras.ops.convert_to_numpy(ops.statistical_cutoff(x, k))
    z = statistics.NormalDist().inv_cdf(sparsity)
    np.testing.assert_allclose(cutoff[:, 0],
                               x.mean(axis=1) + z * x.std(axis=1),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(theirs[kept], (x - cutoff)[kept], atol=1e-4)


def test_gemma3n_topk_replaces_its_gaussian_topk():
    backbone, inputs = _gemma3n(activation_sparsity_pattern=(0.95, 0.95))
    sparse = hub.sparsify(backbone, K)
    mlps = [layer for layer in sparse._flatten_layers()
            if isinstance(layer, Gemma3nTextMLP)]
    assert len(mlps) == 2
    assert all(mlp.activation_sparsity == 0.0 for mlp in mlps)
    assert all(isinstance(mlp.act_fn, TopKActivation) for mlp in mlps)
    # The backbone config keeps its own pattern: a reload installs again.
    assert sparse.get_config()["activation_sparsity_pattern"] == [0.95, 0.95]
    sparse(inputs)
    for layer in sparse.topk_activations:
        assert float(layer.nonzero_fraction.result()) <= K / 16


# keras-hub's own backbone tests, as keras-hub runs them: `setUp`'s init
# kwargs and inputs and `test_backbone_basics`' output shapes of
# keras_hub/src/models/t5/t5_backbone_test.py, vit/vit_backbone_test.py
# and gemma/gemma_backbone_test.py (GitHub keras-team/keras-hub at
# 71453d0, 0.32.0.dev0, whose backbones are 0.32.0's: neither 0.32.0's
# wheel nor its sdist ships tests). The inputs are Keras tensors, as there:
# given NumPy arrays, the harness's `compute_output_spec` passes ViT's
# patch embedding no input shape (a TypeError, Top-k or not).
# name: (backbone class, init kwargs, input data, expected output shape)
HUB_TESTS = {
    "t5": (keras_hub.models.T5Backbone,
           {"vocabulary_size": 10, "num_layers": 2, "num_heads": 2,
            "hidden_dim": 2, "intermediate_dim": 4},
           {"encoder_token_ids": keras.ops.ones((2, 3), "int32"),
            "encoder_padding_mask": keras.ops.zeros((2, 3), "int32"),
            "decoder_token_ids": keras.ops.ones((2, 3), "int32"),
            "decoder_padding_mask": keras.ops.zeros((2, 3), "int32")},
           {"encoder_sequence_output": (2, 3, 2),
            "decoder_sequence_output": (2, 3, 2)}),
    "vit": (keras_hub.models.ViTBackbone,
            {"image_shape": (28, 28, 3), "patch_size": (4, 4),
             "num_layers": 3, "hidden_dim": 48, "num_heads": 6,
             "mlp_dim": 48 * 4, "use_mha_bias": True},
            keras.ops.ones((2, 28, 28, 3)),
            (2, 50, 48)),
    "gemma": (keras_hub.models.GemmaBackbone,
              {"vocabulary_size": 20, "num_layers": 2, "num_query_heads": 4,
               "num_key_value_heads": 1, "hidden_dim": 16,
               "intermediate_dim": 32, "head_dim": 4,
               "layer_norm_epsilon": 1e-6},
              {"token_ids": keras.ops.ones((2, 5), "int32"),
               "padding_mask": keras.ops.ones((2, 5), "int32")},
              (2, 5, 16)),
}
HUB_K = 2  # below every MLP width there: T5's is 4


@pytest.fixture
def harness():
    """keras-hub's test harness (`keras_hub.src.tests.test_case.TestCase`,
    a `tf.test.TestCase`), run by hand as a helper object. Imported here,
    not at the top: keras-hub 0.32's imports grain (the `hub` extra
    installs keras-hub's `grain` extra for it), so an environment without
    it fails these tests only."""
    from keras_hub.src.tests.test_case import TestCase
    case = TestCase()
    case.setUp()
    yield case
    case.tearDown()
    case.doCleanups()


# keras-hub 0.32's T5 attention masks with -1e9, beyond float16's range
# (mixed_float16: a warning, the same without Top-k).
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
# Every backbone at k=2; k=None (measuring only, the same counts) on the
# cheapest: it failed the same precision check before the counts left the
# weights.
@pytest.mark.parametrize("name, k", [
    *((name, HUB_K) for name in sorted(HUB_TESTS)), ("gemma", None)])
def test_keras_hub_backbone_checks_pass_sparse(harness, name, k):
    """keras-hub's own backbone checks, in full, on what `sparsify` gives:
    config and serialization round trips, eager, variable-length and
    compiled calls, the class name, dtype policies (mixed_float16,
    mixed_bfloat16, bfloat16: every float weight in the policy's variable
    dtype, which the float32 counts of the `NonzeroFraction` metrics
    failed while they were weights), int8 and float8 quantization, and a
    `.keras` round trip."""
    keras.utils.set_random_seed(0)
    base, init_kwargs, input_data, output_shape = HUB_TESTS[name]
    sparse = hub.sparsify(base(**init_kwargs), k)
    # The harness builds its backbones itself, from a class and its
    # arguments (once per dtype policy): sparsify's, the base's plus topk.
    cls = type(sparse)
    init_kwargs = {**init_kwargs, "topk": sparse.get_config()["topk"]}
    harness.run_backbone_test(cls=cls, init_kwargs=init_kwargs,
                              input_data=input_data,
                              expected_output_shape=output_shape)
    harness.run_model_saving_test(cls=cls, init_kwargs=init_kwargs,
                                  input_data=input_data)
