"""The one layer-test helper every layer test uses.

`check_layer` puts a layer through the situations a user meets: config and
`.keras` round trips, eager / traced / XLA calls, mixed precision, `fit`
from numpy with a partial last batch and from an unbatched-remainder
tf.data pipeline (where TensorFlow is installed, on either backend), and
data parallelism over two logical CPUs (MirroredStrategy; on JAX,
keras.distribution.DataParallel).
"""

import importlib.util
import os

import keras
import numpy as np

from tests import backend
from topk_sparse.sparsity import metric_state

_BATCH = 4

VOCAB_SIZE = 11
"""Integer inputs are token ids in `[0, VOCAB_SIZE)`."""


def _model(layer_cls, init_kwargs, input_shape, dtype=None,
           input_dtype="float32", features=None):
    """A tiny functional classifier around the layer under test."""
    inputs = keras.Input(input_shape, dtype=input_dtype)
    hidden = layer_cls(**init_kwargs, name="under_test", dtype=dtype)(inputs)
    if features is not None:
        hidden = features(hidden, inputs)
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


def _data(input_shape, n=10, seed=0, input_dtype="float32"):
    rng = np.random.default_rng(seed)
    if np.issubdtype(input_dtype, np.integer):
        x = rng.integers(0, VOCAB_SIZE, size=(n, *input_shape))
    else:
        x = rng.normal(size=(n, *input_shape))
    y = rng.integers(0, 3, size=n)
    return x.astype(input_dtype), y


def check_layer(layer_cls, init_kwargs, input_shape, expected_output_shape,
                expected_num_trainable_weights, tmp_path, *,
                input_dtype="float32", batched_output=True, features=None):
    """Runs every check; `input_shape` and the expected shape omit the batch.

    Args:
      input_dtype: dtype of the inputs; integer inputs are token ids in
        `[0, VOCAB_SIZE)`.
      batched_output: False for a layer whose output has no batch axis
        (`RelativePositionBias`: `[1, heads, q_len, kv_len]`);
        `expected_output_shape` is then the whole output shape.
      features: None, or `features(outputs, inputs)` of Keras tensors
        giving the tensor with a batch axis that the classifier head
        flattens (for outputs without one: combine them with the inputs).
    """
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    assert layer_cls.from_config(config).get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer))
    assert revived.get_config() == config

    x, y = _data(input_shape, input_dtype=input_dtype)
    batch = (None,) if batched_output else ()
    # Symbolic and eager calls.
    symbolic = layer(keras.Input(input_shape, dtype=input_dtype))
    assert tuple(symbolic.shape) == (*batch, *expected_output_shape)
    eager = backend.numpy(layer(x))
    batch = (len(x),) if batched_output else ()
    assert eager.shape == (*batch, *expected_output_shape)
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    # The counts of the layer's metrics are layer state, not weights.
    assert not layer.non_trainable_weights
    assert {id(v) for v in metric_state(layer)} <= {
        id(v) for v in layer.non_trainable_variables}
    # Traced and XLA-compiled calls give the eager result.
    for mode in ("function", "jit"):
        traced = backend.numpy(backend.compiled_call(layer, mode)(x))
        np.testing.assert_allclose(traced, eager, rtol=1e-5, atol=1e-5)

    def model(dtype=None):
        return _model(layer_cls, init_kwargs, input_shape, dtype,
                      input_dtype, features)

    # .keras round trip keeps weights and outputs.
    trained = _compile(model())
    path = os.path.join(tmp_path, "model.keras")
    trained.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               trained.predict(x, verbose=0), rtol=1e-6)
    assert loaded.get_layer("under_test").get_config() == \
        trained.get_layer("under_test").get_config()

    # fit: numpy with a partial last batch (unknown batch dimension).
    history = trained.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # fit: tf.data without drop_remainder, then evaluate.
    if importlib.util.find_spec("tensorflow"):
        import tensorflow as tf
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(_BATCH)
        assert dataset.element_spec[0].shape[0] is None
        history = trained.fit(dataset, epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"]).all()
        trained.evaluate(dataset, verbose=0)

    # jit_compile=True train step.
    compiled = _compile(model(), True)
    history = compiled.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()

    # Mixed precision: computes in the low dtype, weights stay float32.
    for policy in ("mixed_bfloat16", "mixed_float16"):
        mixed = _compile(model(policy))
        sub = mixed.get_layer("under_test")
        assert sub.compute_dtype == policy.split("_")[1]
        assert all(w.dtype == "float32" for w in sub.weights)
        assert keras.backend.standardize_dtype(sub(x).dtype) == \
            policy.split("_")[1]
        history = mixed.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"]).all()

    # Data parallel over two logical CPUs.
    with backend.data_parallel():
        mirrored = _compile(model())
        history = mirrored.fit(x, y, batch_size=_BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    return mirrored, history
