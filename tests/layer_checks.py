"""The one layer-test helper every layer test uses (see shared/STYLE.md).

`check_layer` puts a layer through the situations a user meets: config and
`.keras` round trips, eager / tf.function / jit_compile calls, mixed
precision, `fit` from numpy with a partial last batch and from an unbatched
remainder tf.data pipeline, and MirroredStrategy over two logical CPUs.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from tests.devices import mirrored_strategy

_BATCH = 4


def _model(layer_cls, init_kwargs, input_shape, dtype=None):
    """A tiny functional classifier around the layer under test."""
    inputs = keras.Input(input_shape)
    hidden = layer_cls(**init_kwargs, name="under_test", dtype=dtype)(inputs)
    pooled = keras.layers.Flatten()(hidden)
    outputs = keras.layers.Dense(3, dtype=dtype)(pooled)
    return keras.Model(inputs, outputs)


def _compile(model, jit_compile=False):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _data(input_shape, n=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *input_shape)).astype("float32")
    y = rng.integers(0, 3, size=n)
    return x, y


def check_layer(layer_cls, init_kwargs, input_shape, expected_output_shape,
                expected_num_trainable_weights, tmp_path):
    """Runs every check; `input_shape` and the expected shape omit the batch."""
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    assert layer_cls.from_config(config).get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer))
    assert revived.get_config() == config

    x, y = _data(input_shape)
    # Symbolic and eager calls.
    symbolic = layer(keras.Input(input_shape))
    assert tuple(symbolic.shape) == (None, *expected_output_shape)
    eager = layer(x).numpy()
    assert eager.shape == (len(x), *expected_output_shape)
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    assert not layer.non_trainable_weights
    # tf.function and XLA give the eager result.
    for jit in (False, True):
        traced = tf.function(layer, jit_compile=jit)(x).numpy()
        np.testing.assert_allclose(traced, eager, rtol=1e-5, atol=1e-5)

    # .keras round trip keeps weights and outputs.
    model = _compile(_model(layer_cls, init_kwargs, input_shape))
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-6)
    assert loaded.get_layer("under_test").get_config() == \
        model.get_layer("under_test").get_config()

    # fit: numpy with a partial last batch (unknown batch dimension).
    history = model.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # fit: tf.data without drop_remainder, then evaluate.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(_BATCH)
    assert dataset.element_spec[0].shape[0] is None
    history = model.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    model.evaluate(dataset, verbose=0)

    # jit_compile=True train step.
    compiled = _compile(_model(layer_cls, init_kwargs, input_shape), True)
    history = compiled.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()

    # Mixed precision: computes in the low dtype, weights stay float32.
    for policy in ("mixed_bfloat16", "mixed_float16"):
        mixed = _compile(_model(layer_cls, init_kwargs, input_shape, policy))
        sub = mixed.get_layer("under_test")
        assert sub.compute_dtype == policy.split("_")[1]
        assert all(w.dtype == "float32" for w in sub.weights)
        assert sub(x).dtype == policy.split("_")[1]
        history = mixed.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"]).all()

    # MirroredStrategy over two logical CPUs.
    with mirrored_strategy().scope():
        mirrored = _compile(_model(layer_cls, init_kwargs, input_shape))
    history = mirrored.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    return mirrored, history
