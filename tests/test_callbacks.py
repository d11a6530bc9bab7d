"""SparsityCallback and CalibrationCallback, checked by reading the event
files back: tags, steps (= optimizer iterations) and values against the
layers' metrics and a numpy ECE of the model's own predictions. Run under
both backends (TensorBoard files are TensorFlow's to write on either)."""


import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import backend
from tests.events import read_events
from topk_sparse import SparseMLP, TopKActivation
from topk_sparse.callbacks import CalibrationCallback, SparsityCallback

TOKENS, FEATURES, CLASSES, BATCH = 3, 8, 3, 4
N_TRAIN = 12  # 3 steps per epoch
LAYERS = ("mlp_topk", "mlp_dense")
CALIBRATION_TAGS = {f"calibration/{name}" for name in (
    "expected_calibration_error", "negative_log_likelihood", "brier_score",
    "accuracy", "reliability_diagram")}


def sparsity_tags(paths, histograms=True):
    names = ["nonzero_fraction", "dead_fraction"]
    names += ["neuron_fire_rate", "token_nonzero_fraction"] if histograms \
        else []
    return {f"sparsity/{p}/{n}" for p in paths for n in names} | {
        "sparsity/mean_nonzero_fraction", "sparsity/mean_dead_fraction"}


def data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, TOKENS, FEATURES)).astype("float32")
    return x, rng.integers(0, CLASSES, size=n)


def make_model(jit_compile=False):
    inputs = keras.Input((TOKENS, FEATURES))
    hidden = SparseMLP(16, k=4, name=LAYERS[0])(inputs)
    hidden = SparseMLP(16, name=LAYERS[1])(hidden)  # k=None: dense baseline
    outputs = keras.layers.Dense(CLASSES)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile)
    return model


def steps(events, tag):
    return [step for step, _ in events[tag]]


def last(events, tag):
    return float(events[tag][-1][1])


def ece_numpy(logits, labels, num_bins=15):
    """Guo et al. 2017, eq. 3, bin by bin."""
    probs = np.asarray(keras.ops.softmax(logits), np.float32)
    confidence = probs.max(-1)
    correct = probs.argmax(-1) == labels
    bins = np.minimum(np.floor(confidence * np.float32(num_bins)),
                      num_bins - 1)
    return sum(np.mean(bins == b) * abs(correct[bins == b].mean()
                                        - confidence[bins == b].mean())
               for b in range(num_bins) if np.any(bins == b))


def check_sparsity_values(events, model, history, paths=LAYERS):
    """The last epoch's scalars are the training counts of the layers."""
    for path in paths:
        nonzero = last(events, f"sparsity/{path}/nonzero_fraction")
        np.testing.assert_allclose(
            nonzero, history[f"{path}/nonzero_fraction"][-1], rtol=1e-6)
        sparsity = model.get_layer(path).nonzero_fraction
        np.testing.assert_allclose(
            last(events, f"sparsity/{path}/dead_fraction"),
            float(sparsity.dead_fraction()), rtol=1e-6)
        # One rate per hidden neuron; one fraction per training token.
        buckets = events[f"sparsity/{path}/neuron_fire_rate"][-1][1]
        assert buckets[:, 2].sum() == 16
        assert buckets[:, 0].min() >= 0 and buckets[:, 1].max() <= 1
        np.testing.assert_allclose(
            buckets[:, 2] @ (buckets[:, 0] + buckets[:, 1]) / 2 / 16,
            nonzero, rtol=0.1)
        tokens = events[f"sparsity/{path}/token_nonzero_fraction"][-1][1]
        assert tokens[:, 2].sum() == float(sparsity.token_count.numpy())
        fractions, token_counts = sparsity.token_nonzero_fractions()
        assert tokens[0, 0] == fractions.min()
        assert tokens[-1, 1] == fractions.max()
        np.testing.assert_allclose(
            fractions @ token_counts / token_counts.sum(), nonzero, rtol=1e-6)
    mean = np.mean([history[f"{p}/nonzero_fraction"][-1] for p in paths])
    np.testing.assert_allclose(last(events, "sparsity/mean_nonzero_fraction"),
                               mean, rtol=1e-6)
    np.testing.assert_allclose(history["mean_nonzero_fraction"][-1], mean,
                               rtol=1e-6)
    assert 0 < history[f"{LAYERS[0]}/nonzero_fraction"][-1] <= 4 / 16


def check_calibration(events, plugins, history, model, x_val, y_val, step):
    logits = model.predict(x_val, verbose=0)
    expected = {
        "expected_calibration_error": ece_numpy(logits, y_val),
        "accuracy": np.mean(logits.argmax(-1) == y_val),
        "negative_log_likelihood": float(np.mean(
            keras.losses.sparse_categorical_crossentropy(
                y_val, logits, from_logits=True))),
    }
    for name, value in expected.items():
        assert steps(events, f"calibration/{name}")[-1] == step
        np.testing.assert_allclose(last(events, f"calibration/{name}"), value,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(history[f"val_{name}"][-1], value,
                                   rtol=1e-5, atol=1e-6)
    assert "val_brier_score" in history
    assert plugins["calibration/reliability_diagram"] == "images"
    width, height, png = events["calibration/reliability_diagram"][-1][1]
    assert (int(width), int(height)) == (480, 600)  # matplotlib, 100 dpi
    assert tf.io.decode_png(png).shape == (600, 480, 3)


def test_sparsity_callback_epochs_with_validation(tmp_path):
    model = make_model()
    x, y = data(N_TRAIN, 0)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, verbose=0,
        validation_data=data(5, 1),
        callbacks=[SparsityCallback(tmp_path)]).history
    events, plugins = read_events(tmp_path)
    assert set(events) == sparsity_tags(LAYERS)
    assert plugins["sparsity/mean_nonzero_fraction"] == "scalars"
    assert plugins[f"sparsity/{LAYERS[0]}/neuron_fire_rate"] == "histograms"
    assert plugins[f"sparsity/{LAYERS[0]}/token_nonzero_fraction"] \
        == "histograms"
    for tag in events:
        assert steps(events, tag) == [3, 6]
    assert int(model.optimizer.iterations.numpy()) == 6
    # Validation reset the layer metrics before on_epoch_end: the callback
    # still wrote the training values, not the validation ones.
    for path in LAYERS:
        np.testing.assert_allclose(
            last(events, f"sparsity/{path}/nonzero_fraction"),
            history[f"{path}/nonzero_fraction"][-1], rtol=1e-6)
        np.testing.assert_allclose(
            float(model.get_layer(path).nonzero_fraction.result()),
            history[f"val_{path}/nonzero_fraction"][-1], rtol=1e-6)
    assert len(history["mean_nonzero_fraction"]) == 2
    assert len(history["mean_dead_fraction"]) == 2


def test_sparsity_update_freq_steps(tmp_path):
    model = make_model()
    x, y = data(N_TRAIN, 0)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
              callbacks=[SparsityCallback(tmp_path, update_freq=2)])
    events, _ = read_events(tmp_path)
    # Every 2 steps (2, 4, 6) and at the ends of epochs (3, 6): 6 once.
    for tag in events:
        assert steps(events, tag) == [2, 3, 4, 6]
    # Mid-epoch values cover the epoch so far: step 4 is 1 batch of epoch 2.
    fraction = dict(events[f"sparsity/{LAYERS[0]}/nonzero_fraction"])
    assert 0 < float(fraction[4]) <= 4 / 16


def test_sparse_mlps_paths_and_no_histograms(tmp_path):
    class Blocks(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.blocks = [SparseMLP(16, k=4, name=f"block_{i}_mlp")
                           for i in range(2)]
            self.topk = TopKActivation(k=2, name="head_topk")
            self.head = keras.layers.Dense(CLASSES)

        def call(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(keras.ops.mean(self.topk(x), axis=1))

    model = Blocks()
    model.compile(optimizer="sgd", loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(N_TRAIN, 0)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0,
        callbacks=[SparsityCallback(tmp_path, histograms=False)]).history
    events, _ = read_events(tmp_path)
    paths = ["block_0_mlp", "block_1_mlp", "head_topk"]  # layer names
    assert set(events) == sparsity_tags(paths, histograms=False)
    metrics = [b.nonzero_fraction for b in model.blocks] + [
        model.topk.nonzero_fraction]
    for path, metric in zip(paths, metrics):
        assert steps(events, f"sparsity/{path}/nonzero_fraction") == [3]
        np.testing.assert_allclose(
            last(events, f"sparsity/{path}/nonzero_fraction"),
            float(metric.result()), rtol=1e-6)
    assert history["mean_nonzero_fraction"][0] == pytest.approx(
        np.mean([float(m.result()) for m in metrics]), rel=1e-6)


def test_both_callbacks_jit_compile(tmp_path):
    model = make_model(jit_compile=True)
    assert model.jit_compile
    x, y = data(N_TRAIN, 0)
    x_val, y_val = data(13, 2)  # batches of 5: a partial last batch
    validation = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(5)
    # Calibration first: its pass must not leak into the sparsity counts.
    callbacks = [CalibrationCallback(tmp_path / "calibration", validation),
                 SparsityCallback(tmp_path / "sparsity")]
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                        callbacks=callbacks).history
    # After the calibration pass: the epoch's training tokens only.
    for path in LAYERS:
        assert float(model.get_layer(path).nonzero_fraction.token_count.numpy()) == \
            N_TRAIN * TOKENS
    events, _ = read_events(tmp_path / "sparsity")
    check_sparsity_values(events, model, history)
    events, plugins = read_events(tmp_path / "calibration")
    assert set(events) == CALIBRATION_TAGS
    for tag in events:
        assert steps(events, tag) == [3, 6]
    check_calibration(events, plugins, history, model, x_val, y_val, step=6)


def test_both_callbacks_data_parallel(tmp_path):
    x, y = data(N_TRAIN, 0)
    x_val, y_val = data(11, 3)
    callbacks = [
        SparsityCallback(tmp_path / "sparsity"),
        CalibrationCallback(tmp_path / "calibration", (x_val, y_val),
                            freq=2, batch_size=4),
    ]
    # MirroredStrategy (XLA off: CPU devices) or keras.distribution.
    with backend.data_parallel():
        model = make_model(jit_compile=backend.BACKEND == "jax")
        history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                            callbacks=callbacks).history
    # Both replicas' tokens (the sum variables, read outside a replica), and
    # none from the calibration pass.
    for path in LAYERS:
        assert float(model.get_layer(path).nonzero_fraction.token_count.numpy()) == \
            N_TRAIN * TOKENS
    events, _ = read_events(tmp_path / "sparsity")
    for tag in events:
        assert steps(events, tag) == [3, 6]
    check_sparsity_values(events, model, history)
    events, plugins = read_events(tmp_path / "calibration")
    assert set(events) == CALIBRATION_TAGS
    for tag in events:
        assert steps(events, tag) == [6]  # freq=2: the second epoch only
    assert len(history["val_expected_calibration_error"]) == 1
    # Each example once: the replicas split the batches, none saw them all.
    ece = callbacks[1]._metrics[0]
    assert float(np.sum(ece.bin_count.numpy())) == len(x_val)
    check_calibration(events, plugins, history, model, x_val, y_val, step=6)


@pytest.mark.parametrize("update_freq", ["batch", 0, -2, 1.5, True, None])
def test_bad_update_freq(update_freq, tmp_path):
    with pytest.raises(ValueError, match="update_freq"):
        SparsityCallback(tmp_path, update_freq=update_freq)


@pytest.mark.parametrize("track_sparsity", [None, False])
def test_model_without_sparse_layers(track_sparsity, tmp_path):
    inputs = keras.Input((TOKENS, FEATURES))
    hidden = inputs if track_sparsity is None else SparseMLP(
        16, k=4, track_sparsity=False)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(hidden[:, 0]))
    model.compile(optimizer="sgd", loss="mse")
    x, y = data(4, 0)
    with pytest.raises(ValueError, match="NonzeroFraction"):
        model.fit(x, np.eye(CLASSES)[y], verbose=0,
                  callbacks=[SparsityCallback(tmp_path)])


@pytest.mark.parametrize("kwargs, match", [
    ({"freq": 0}, "freq"),
    ({"num_bins": 0}, "num_bins"),
    ({"batch_size": 1.5}, "batch_size"),
    ({"validation_data": np.zeros((4, 8))}, "validation_data"),
    ({"validation_data": tf.data.Dataset.range(4).batch(2)}, "labels"),
])
def test_bad_calibration_arguments(kwargs, match, tmp_path):
    kwargs = {"validation_data": data(4, 0), **kwargs}
    with pytest.raises(ValueError, match=match):
        CalibrationCallback(tmp_path, **kwargs)
