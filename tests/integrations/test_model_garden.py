"""Top-k in TensorFlow Model Garden (tf_keras): topk_sparse.integrations.

Runs in the environment of `pip install -e ".[garden]"` (see
`.ci/integrations.sh`), on tiny random-weight models.
"""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from official.nlp.modeling import layers as nlp_layers
from official.nlp.modeling import networks
from official.vision.modeling.backbones import vit

from topk_sparse import ops
from topk_sparse.integrations import model_garden

SEQ, WIDTH, INNER, K = 6, 16, 32, 4


def _classifier(encoder_outputs, inputs, jit_compile=False):
    logits = tf_keras.layers.Dense(3, name="logits")(encoder_outputs)
    model = tf_keras.Model(inputs, logits)
    model.compile(
        tf_keras.optimizers.Adam(1e-2),
        tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile)
    return model


def _bert_model(jit_compile=False):
    encoder = networks.BertEncoderV2(
        vocab_size=20, hidden_size=WIDTH, num_layers=2, num_attention_heads=2,
        inner_dim=INNER, max_sequence_length=SEQ, output_dropout=0.0,
        attention_dropout=0.0, name="encoder",
        inner_activation=model_garden.topk_activation(K))
    inputs = {name: tf_keras.Input((SEQ,), dtype="int32", name=name)
              for name in ("input_word_ids", "input_mask", "input_type_ids")}
    return _classifier(encoder(inputs)["pooled_output"], inputs,
                       jit_compile)


def _bert_data(batch=8):
    rng = np.random.default_rng(0)
    x = {"input_word_ids": rng.integers(0, 20, (batch, SEQ), "int32"),
         "input_mask": np.ones((batch, SEQ), "int32"),
         "input_type_ids": np.zeros((batch, SEQ), "int32")}
    return x, rng.integers(0, 3, batch)


def _sparsity_logs(history):
    return {name: values[-1] for name, values in history.history.items()
            if name.endswith("/nonzero_fraction")}


def test_importing_topk_sparse_needs_no_tf_keras():
    code = ("import sys, topk_sparse, topk_sparse.integrations; "
            "print(sorted({'tf_keras', 'official'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_topk_activation_is_an_identifier_tf_keras_resolves():
    identifier = model_garden.topk_activation(2, method="exact")
    layer = tf_keras.activations.get(identifier)
    assert isinstance(layer, model_garden.TopKActivation)
    x = tf.constant([[3.0, -1.0, 2.0, 5.0]])
    np.testing.assert_array_equal(layer(x), ops.topk_mask(x, 2, "exact"))
    # Every resolution is a new layer: one per block, one metric per block.
    assert tf_keras.activations.get(identifier) is not layer
    with pytest.raises(ValueError, match="k"):
        model_garden.topk_activation(0)


def test_bert_encoder_v2_trains_under_xla_and_logs_each_block():
    model = _bert_model(jit_compile=True)
    x, y = _bert_data()
    weights = [w.numpy() for w in model.trainable_weights]
    history = model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.array_equal(w, v.numpy())
               for w, v in zip(weights, model.trainable_weights))
    logs = _sparsity_logs(history)
    assert sorted(logs) == [
        "encoder/transformer/layer_0/nonzero_fraction",
        "encoder/transformer/layer_1/nonzero_fraction"]
    for value in logs.values():
        assert 0 < value <= K / INNER


# HDF5 on purpose: tf_keras code still saves it, legacy or not.
@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5")
def test_bert_encoder_v2_survives_every_save_format(tmp_path):
    model = _bert_model()
    x, y = _bert_data()
    model.fit(x, y, epochs=1, verbose=0)
    expected = model.predict(x, verbose=0)
    for name in ("model.keras", "model.h5"):
        model.save(str(tmp_path / name))
        loaded = tf_keras.models.load_model(str(tmp_path / name))
        np.testing.assert_allclose(loaded.predict(x, verbose=0), expected,
                                   rtol=1e-6, atol=1e-6)
        encoder, = [layer for layer in loaded.layers
                    if isinstance(layer, networks.BertEncoderV2)]
        assert encoder.get_config()["inner_activation"]["config"]["k"] == K
        assert len(_topk_layers(encoder)) == 2
    # SavedModel: served, outputs as before.
    model.save(str(tmp_path / "saved_model"), save_format="tf")
    serving = tf.saved_model.load(str(tmp_path / "saved_model"))
    outputs = serving.signatures["serving_default"](
        **{name: tf.constant(value) for name, value in x.items()})
    np.testing.assert_allclose(outputs["logits"], expected, atol=1e-5)
    # And revived by tf_keras from its config, Top-k included (no "Unknown
    # activation function"). Its weights are another matter: with
    # tf-models-official 2.20 a SavedModel revives the blocks' attention
    # weights re-initialized, dense blocks too, so outputs are not compared.
    revived = tf_keras.models.load_model(str(tmp_path / "saved_model"))
    assert len(_topk_layers(revived)) == 2


def _topk_layers(layer):
    return [sub for sub in layer._flatten_layers()
            if isinstance(sub, model_garden.TopKActivation)]


def test_transformer_encoder_block_alone():
    inputs = tf_keras.Input((SEQ, WIDTH))
    hidden = nlp_layers.TransformerEncoderBlock(
        2, INNER, model_garden.topk_activation(K, method="statistical"),
        name="block")(inputs)
    model = _classifier(tf_keras.layers.Flatten()(hidden), inputs)
    x = np.random.default_rng(0).normal(size=(8, SEQ, WIDTH))
    history = model.fit(x.astype("float32"), np.arange(8) % 3, verbose=0)
    assert list(_sparsity_logs(history)) == ["block/nonzero_fraction"]


def _scaffold_model(**scaffold_kwargs):
    inputs = tf_keras.Input((SEQ, WIDTH))
    hidden = nlp_layers.TransformerScaffold(
        num_attention_heads=2, inner_dim=INNER, name="scaffold",
        inner_activation=model_garden.topk_activation(K),
        **scaffold_kwargs)(inputs)
    return _classifier(hidden[:, 0], inputs)


@pytest.mark.parametrize("feedforward_cls", [None,
                                             model_garden.TopKFeedforward])
def test_transformer_scaffold(tmp_path, feedforward_cls):
    model = _scaffold_model(feedforward_cls=feedforward_cls)
    x = np.random.default_rng(0).normal(size=(8, SEQ, WIDTH))
    x = x.astype("float32")
    history = model.fit(x, np.arange(8) % 3, epochs=2, verbose=0)
    name = ("scaffold/feedforward/nonzero_fraction" if feedforward_cls
            else "scaffold/nonzero_fraction")
    logs = _sparsity_logs(history)
    assert list(logs) == [name] and 0 < logs[name] <= K / INNER
    expected = model.predict(x, verbose=0)
    model.save(str(tmp_path / "model.keras"))
    loaded = tf_keras.models.load_model(str(tmp_path / "model.keras"))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)


def test_feedforward_gathered_path_matches_masked():
    x = np.random.default_rng(1).normal(size=(1, 2, WIDTH))
    x = tf.constant(x, tf.float32)
    masked = model_garden.TopKFeedforward(INNER, k=2,
                                          implementation="masked")
    gather = model_garden.TopKFeedforward.from_config(
        {**masked.get_config(), "implementation": "gather"})
    masked(x)
    gather(x)
    # Each kernel is drawn on its own (a shared unseeded tf_keras
    # initializer would give both the same values).
    assert not np.array_equal(np.ravel(masked.intermediate_kernel),
                              np.ravel(masked.output_kernel))
    gather.set_weights(masked.get_weights())
    # "auto" gathers here: 2 tokens x k=2 <= 32 / 6.
    assert masked.gathers(x) is False and gather.gathers(x)
    np.testing.assert_allclose(gather(x), masked(x), atol=1e-6)
    assert float(gather.nonzero_fraction.result()) == pytest.approx(
        2 / INNER)
    with pytest.raises(ValueError, match="needs k"):
        model_garden.TopKFeedforward(INNER, inner_activation="relu")


def test_encoder_scaffold_hidden_cfg():
    encoder = networks.EncoderScaffold(
        num_hidden_instances=2, pooled_output_dim=WIDTH,
        embedding_cfg=dict(
            vocab_size=20, type_vocab_size=2, hidden_size=WIDTH,
            seq_length=SEQ, max_seq_length=SEQ, dropout_rate=0.0,
            initializer=tf_keras.initializers.TruncatedNormal(0.02)),
        hidden_cfg=dict(
            num_attention_heads=2, intermediate_size=INNER,
            intermediate_activation=model_garden.topk_activation(K),
            dropout_rate=0.0, attention_dropout_rate=0.0,
            kernel_initializer="glorot_uniform"))
    x, _ = _bert_data()
    encoder([x["input_word_ids"], x["input_mask"], x["input_type_ids"]])
    layers = _topk_layers(encoder)
    assert len(layers) == 2 and len({id(layer) for layer in layers}) == 2
    for layer in layers:
        assert 0 < float(layer.nonzero_fraction.result()) <= K / INNER


VIT = dict(mlp_dim=INNER, num_heads=2, num_layers=2, hidden_size=WIDTH,
           patch_size=4, dropout_rate=0.0,
           input_specs=tf_keras.layers.InputSpec(shape=[None, 8, 8, 3]))


def test_vision_transformer_with_topk_mlps(tmp_path):
    model = model_garden.TopKVisionTransformer(k=K, **VIT)
    assert vit.Encoder is not model_garden.TopKEncoder  # swap undone
    encoder = next(layer for layer in model.layers
                   if isinstance(layer, model_garden.TopKEncoder))
    assert encoder.get_config()["k"] == K
    for block in encoder._encoder_layers:
        assert block.get_config()["inner_activation"]["config"]["k"] == K
    assert set(model.output) == {"pre_logits"}

    # A dense checkpoint restores into it: same variables, same order.
    dense = vit.VisionTransformer(**VIT)
    assert [w.shape for w in dense.weights] == [w.shape for w in
                                                model.weights]
    path = tf.train.Checkpoint(model=dense).save(str(tmp_path / "dense"))
    tf.train.Checkpoint(model=model).read(path).expect_partial()
    for a, b in zip(dense.trainable_weights, model.trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    images = tf_keras.Input((8, 8, 3))
    features = tf_keras.layers.Flatten()(model(images)["pre_logits"])
    classifier = _classifier(features, images, jit_compile=True)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
    history = classifier.fit(x, np.arange(8) % 3, verbose=0)
    logs = _sparsity_logs(history)
    assert len(logs) == 2
    for value in logs.values():
        assert 0 < value <= K / INNER

    # Model Garden exports vision backbones as SavedModels.
    expected = model(x, training=False)["pre_logits"]
    tf.saved_model.save(model, str(tmp_path / "saved_model"))
    restored = tf.saved_model.load(str(tmp_path / "saved_model"))
    np.testing.assert_allclose(restored(x, training=False)["pre_logits"],
                               expected, atol=1e-5)


def test_vision_transformer_rejects_k_above_mlp_dim():
    with pytest.raises(ValueError, match="larger than"):
        model_garden.TopKVisionTransformer(k=INNER + 1, **VIT)
