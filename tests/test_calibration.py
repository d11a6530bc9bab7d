"""Tests for topk_sparse.calibration against plain numpy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st
from matplotlib import pyplot
from sklearn.metrics import log_loss

# Importing it configures two logical CPUs before TensorFlow starts (if
# conftest.py has not already); its one shared MirroredStrategy avoids the
# collective-key clash of two strategies in one process.
from tests.devices import mirrored_strategy
from topk_sparse.calibration import (
    BrierScore,
    ExpectedCalibrationError,
    NegativeLogLikelihood,
    _reliability_summary,
    reliability_diagram_image,
)

METRICS = [ExpectedCalibrationError, NegativeLogLikelihood, BrierScore]


# ---------------------------------------------------------------- references
def expected_calibration_error_numpy(probs, labels, num_bins=15, weights=None):
    """ECE written out bin by bin, as in Guo et al. 2017, eq. 3."""
    probs = np.asarray(probs, np.float32)
    labels = np.asarray(labels).reshape(-1)
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights)
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    # float32 product, as the metric computes it, so edge cases agree.
    bins = np.floor(confidence * np.float32(num_bins))
    bins = np.minimum(bins, num_bins - 1)
    total, ece = weights.sum(), 0.0
    for b in range(num_bins):
        w = weights[bins == b]
        if w.sum() > 0:
            accuracy = np.average(correct[bins == b], weights=w)
            mean_confidence = np.average(confidence[bins == b], weights=w)
            ece += w.sum() / total * abs(accuracy - mean_confidence)
    return ece


def nll_sklearn(probs, labels, weights=None):
    """scikit-learn's log loss of the float32 probabilities the metric sees."""
    probs = np.asarray(probs, np.float32)
    return log_loss(labels, probs, labels=np.arange(probs.shape[-1]),
                    sample_weight=weights)


def nll_log_softmax(logits, labels, weights=None):
    """The exact NLL, log_softmax in float64."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.average(-log_probs[np.arange(len(labels)), labels],
                      weights=weights)


def brier_numpy(probs, labels, weights=None):
    probs = np.asarray(probs, np.float64)
    one_hot = np.eye(probs.shape[-1])[labels]
    return np.average(((probs - one_hot) ** 2).sum(-1), weights=weights)


def random_case(seed, batch=32, classes=4, temperature=1.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(batch, classes)) * 3 / temperature)
    logits = logits.astype(np.float32)
    probs = np.asarray(keras.ops.softmax(logits), np.float32)
    labels = rng.integers(0, classes, size=batch)
    return logits, probs, labels


def evaluate(metric, y_true, y_pred, sample_weight=None):
    metric.update_state(y_true, y_pred, sample_weight=sample_weight)
    return float(metric.result())


# ------------------------------------------------------------------------ ECE
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 40),
    classes=st.integers(2, 6),
    num_bins=st.integers(1, 20),
    weighted=st.booleans(),
)
def test_ece_matches_numpy(seed, batch, classes, num_bins, weighted):
    _, probs, labels = random_case(seed, batch, classes)
    weights = None
    if weighted:
        weights = np.random.default_rng(seed).uniform(0, 2, batch)
    got = evaluate(
        ExpectedCalibrationError(num_bins), labels, probs, weights
    )
    want = expected_calibration_error_numpy(probs, labels, num_bins, weights)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ece_perfectly_calibrated_is_zero():
    # In each bin exactly a share c of the samples with confidence c is right.
    probs, labels = [], []
    for c in (0.6, 0.7, 0.8, 0.9, 1.0):
        probs += [[c, 1 - c]] * 10
        labels += [0] * round(10 * c) + [1] * (10 - round(10 * c))
    got = evaluate(ExpectedCalibrationError(10), labels, np.float32(probs))
    assert got == pytest.approx(0.0, abs=1e-6)


def test_ece_labels_sampled_from_predictions_is_small():
    _, probs, _ = random_case(0, batch=20000, classes=3)
    rng = np.random.default_rng(1)
    labels = (probs.cumsum(-1) < rng.uniform(size=(20000, 1))).sum(-1)
    labels = np.minimum(labels, 2)  # float32 cumsum can end just below 1.
    assert evaluate(ExpectedCalibrationError(), labels, probs) < 0.02


def test_ece_hand_computed():
    probs = np.float32(
        [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [1.0, 0.0]]
    )
    labels = [0, 0, 0, 1, 1]
    # 4 bins: 0.6, 0.7 -> bin 2 (acc 1, conf 0.65); 0.9, 0.8, 1.0 -> bin 3
    # (acc 1/3, conf 0.9). ECE = 2/5 * 0.35 + 3/5 * (0.9 - 1/3) = 0.48.
    metric = ExpectedCalibrationError(num_bins=4)
    assert evaluate(metric, labels, probs) == pytest.approx(0.48, abs=1e-6)
    diagram = metric.reliability_diagram()
    np.testing.assert_allclose(diagram["bin_edges"], [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(diagram["count"], [0, 0, 2, 3])
    np.testing.assert_allclose(diagram["confidence"], [0, 0, 0.65, 0.9],
                               atol=1e-6)
    np.testing.assert_allclose(diagram["accuracy"], [0, 0, 1, 1 / 3],
                               atol=1e-6)


def test_ece_bin_edges_are_left_closed_and_one_goes_last():
    metric = ExpectedCalibrationError(num_bins=4)
    metric.update_state([0, 0, 0], np.float32([[0.5, 0.5], [0.75, 0.25],
                                                [1.0, 0.0]]))
    np.testing.assert_allclose(metric.reliability_diagram()["count"],
                               [0, 0, 1, 2])


def test_ece_empty_is_zero():
    assert float(ExpectedCalibrationError().result()) == 0.0


# ------------------------------------------------------------ NLL and Brier
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nll_and_brier_match_numpy(seed):
    _, probs, labels = random_case(seed, batch=17, classes=5)
    weights = np.random.default_rng(seed).uniform(0, 2, 17)
    for metric, reference in [
        (NegativeLogLikelihood(), nll_sklearn),
        (BrierScore(), brier_numpy),
    ]:
        np.testing.assert_allclose(
            evaluate(metric, labels, probs), reference(probs, labels),
            rtol=1e-5,
        )
        metric.reset_state()
        np.testing.assert_allclose(
            evaluate(metric, labels, probs, weights),
            reference(probs, labels, weights),
            rtol=1e-5,
        )


# Saturated: four certain and right, one certain and wrong by a logit margin
# of 115, whose softmax probability (e^-115) is 0 in float32.
SATURATED_LOGITS = np.float32([[0, 40], [40, 0], [0, 40], [40, 0], [115, 0]])
SATURATED_LABELS = np.array([1, 0, 1, 0, 1])


@pytest.mark.parametrize("case", ["random", "saturated"])
def test_nll_from_probabilities_is_sklearn_log_loss(case):
    if case == "random":
        _, probs, labels = random_case(9, batch=40, classes=5,
                                       temperature=0.1)
    else:
        labels = SATURATED_LABELS
        probs = np.asarray(keras.ops.softmax(SATURATED_LOGITS), np.float32)
    weights = np.random.default_rng(9).uniform(0, 2, len(labels))
    for w in (None, weights):
        np.testing.assert_allclose(
            evaluate(NegativeLogLikelihood(), labels, probs, w),
            nll_sklearn(probs, labels, w), rtol=1e-6,
        )


@pytest.mark.parametrize("case", ["random", "saturated"])
def test_nll_from_logits_is_exact_log_softmax(case):
    if case == "random":
        logits, _, labels = random_case(10, batch=40, classes=5,
                                        temperature=0.1)
    else:
        logits, labels = SATURATED_LOGITS, SATURATED_LABELS
    weights = np.random.default_rng(10).uniform(0, 2, len(labels))
    for w in (None, weights):
        np.testing.assert_allclose(
            evaluate(NegativeLogLikelihood(from_logits=True), labels, logits,
                     w),
            nll_log_softmax(logits, labels, w), rtol=1e-6,
        )


def test_nll_saturated_forms_differ_as_documented():
    probs = np.asarray(keras.ops.softmax(SATURATED_LOGITS), np.float32)
    assert probs[-1, 1] == 0.0
    from_logits = evaluate(NegativeLogLikelihood(from_logits=True),
                           SATURATED_LABELS, SATURATED_LOGITS)
    from_probs = evaluate(NegativeLogLikelihood(), SATURATED_LABELS, probs)
    # Logits: the mistake costs its margin, 115 nats (the others ~e^-40).
    assert from_logits == pytest.approx(115 / 5, rel=1e-6)
    # Probabilities: clipped to [eps, 1 - eps], eps = 2**-23, as sklearn:
    # -log(eps) for the mistake, -log(1 - eps) for each certain right one.
    eps = 2.0 ** -23
    want = (-np.log(eps) - 4 * np.log1p(-eps)) / 5
    assert from_probs == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(3.1885, abs=1e-4)


def test_brier_extremes():
    probs = np.float32([[1.0, 0.0], [1.0, 0.0]])
    # Right and certain: 0; wrong and certain: 2.
    assert evaluate(BrierScore(), [0, 1], probs) == pytest.approx(1.0)


# -------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("metric_class", METRICS)
def test_one_hot_and_sparse_labels_agree(metric_class):
    _, probs, labels = random_case(3, batch=20, classes=4)
    one_hot = np.eye(4, dtype=np.float32)[labels]
    values = [
        evaluate(metric_class(), y, probs)
        for y in (labels, labels[:, None], labels.astype(np.float32), one_hot)
    ]
    np.testing.assert_allclose(values, values[0], rtol=1e-6)


@pytest.mark.parametrize("metric_class", METRICS)
def test_from_logits(metric_class):
    logits, probs, labels = random_case(4, batch=20, classes=4)
    np.testing.assert_allclose(
        evaluate(metric_class(from_logits=True), labels, logits),
        evaluate(metric_class(), labels, probs),
        rtol=1e-5, atol=1e-6,
    )


@pytest.mark.parametrize("metric_class", METRICS)
def test_sample_weight_equals_repeating_samples(metric_class):
    _, probs, labels = random_case(5, batch=12, classes=3)
    counts = np.random.default_rng(5).integers(0, 4, 12)
    repeated = evaluate(
        metric_class(), np.repeat(labels, counts), np.repeat(probs, counts, 0)
    )
    for weights in (counts, counts[:, None].astype(np.float32)):
        np.testing.assert_allclose(
            evaluate(metric_class(), labels, probs, weights), repeated,
            rtol=1e-5,
        )
    # A scalar weight changes nothing.
    np.testing.assert_allclose(
        evaluate(metric_class(), labels, probs, 3.0),
        evaluate(metric_class(), labels, probs), rtol=1e-6,
    )


@pytest.mark.parametrize("metric_class", METRICS)
def test_batches_accumulate_like_one_shot_and_reset(metric_class):
    _, probs, labels = random_case(6, batch=30, classes=3)
    one_shot = evaluate(metric_class(), labels, probs)
    metric = metric_class()
    for start in range(0, 30, 7):  # uneven batches: 7, 7, 7, 7, 2
        metric.update_state(labels[start:start + 7], probs[start:start + 7])
    np.testing.assert_allclose(float(metric.result()), one_shot, rtol=1e-5)
    metric.reset_state()
    assert float(metric.result()) == 0.0
    assert all(not np.any(v.numpy()) for v in metric.variables)
    np.testing.assert_allclose(evaluate(metric, labels, probs), one_shot,
                               rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("metric_class", METRICS)
def test_low_precision_predictions_computed_in_float32(metric_class, dtype):
    _, probs, labels = random_case(7, batch=25, classes=4)
    low = keras.ops.cast(probs, dtype)
    # The reference is the float32 metric on the already-rounded values.
    rounded = np.asarray(keras.ops.cast(low, "float32"))
    metric = metric_class()
    metric.update_state(labels, low)
    assert keras.backend.standardize_dtype(metric.result().dtype) == "float32"
    np.testing.assert_allclose(
        float(metric.result()), evaluate(metric_class(), labels, rounded),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "metric", [ExpectedCalibrationError(7, from_logits=True, name="ece"),
               NegativeLogLikelihood(from_logits=True), BrierScore()],
    ids=lambda m: m.name,
)
def test_config_and_serialization_round_trip(metric):
    config = metric.get_config()
    clone = type(metric).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(metric)
    assert serialized["registered_name"] == (
        f"topk_sparse>{type(metric).__name__}"
    )
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is type(metric)
    assert restored.get_config() == config
    logits, _, labels = random_case(8, classes=3)
    np.testing.assert_allclose(
        evaluate(restored, labels, logits), evaluate(clone, labels, logits)
    )


@pytest.mark.parametrize("num_bins", [0, -3, 2.5, True, "15", None])
def test_invalid_num_bins(num_bins):
    with pytest.raises(ValueError, match="num_bins"):
        ExpectedCalibrationError(num_bins=num_bins)


@pytest.mark.parametrize("metric_class", METRICS)
def test_invalid_shapes(metric_class):
    with pytest.raises(ValueError, match="y_pred"):
        metric_class().update_state([0, 1], np.float32([0.3, 0.7]))
    with pytest.raises(ValueError, match="y_pred"):
        metric_class().update_state([0], np.ones((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="y_true"):
        metric_class().update_state(np.zeros((2, 3)), np.ones((2, 2)) / 2)

    # The class dimension must be static, e.g. when traced without it.
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
    def update(y_pred):
        metric_class().update_state(tf.zeros([2], tf.int32), y_pred)

    with pytest.raises(ValueError, match="classes"):
        update.get_concrete_function()


# ------------------------------------------------- reliability diagram image
def _calibrated_and_overconfident():
    calibrated = ExpectedCalibrationError(num_bins=10)
    probs, labels = [], []
    for c in (0.6, 0.7, 0.8, 0.9):
        probs += [[c, 1 - c]] * 10
        labels += [0] * round(10 * c) + [1] * (10 - round(10 * c))
    calibrated.update_state(labels, np.float32(probs))
    overconfident = ExpectedCalibrationError(num_bins=10)
    overconfident.update_state(np.ones(len(probs), int), np.float32(probs))
    return (calibrated.reliability_diagram(),
            overconfident.reliability_diagram())


def test_reliability_summary_hand_computed():
    # The case of test_ece_hand_computed: 4 bins, 2 and 3 samples in the top
    # two, top-1 right for 0.9, 0.6 and 0.7.
    probs = np.float32(
        [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [1.0, 0.0]]
    )
    metric = ExpectedCalibrationError(num_bins=4)
    metric.update_state([0, 0, 0, 1, 1], probs)
    summary = _reliability_summary(metric.reliability_diagram())
    assert summary["total"] == 5
    np.testing.assert_allclose(summary["share"], [0, 0, 0.4, 0.6])
    np.testing.assert_array_equal(summary["filled"], [0, 0, 1, 1])
    np.testing.assert_allclose(summary["gap"], [0, 0, 0.65 - 1, 0.9 - 1 / 3],
                               atol=1e-6)
    assert summary["expected_calibration_error"] == pytest.approx(
        float(metric.result()), abs=1e-6)
    assert summary["accuracy"] == pytest.approx(3 / 5, abs=1e-6)
    assert summary["confidence"] == pytest.approx(0.8, abs=1e-6)


def test_reliability_summary_empty_is_zero():
    summary = _reliability_summary(
        ExpectedCalibrationError().reliability_diagram())
    assert summary["total"] == 0 and not summary["filled"].any()
    for name in ("share", "gap", "expected_calibration_error", "confidence",
                 "accuracy"):
        np.testing.assert_array_equal(summary[name], 0, err_msg=name)


def test_reliability_diagram_image_shape_and_no_pyplot_figures():
    calibrated, _ = _calibrated_and_overconfident()
    # As CalibrationCallback calls it: the diagram alone.
    image = reliability_diagram_image(calibrated)
    assert image.shape == (1, 600, 480, 3) and image.dtype == np.uint8
    small = reliability_diagram_image(calibrated, title="epoch 3", dpi=50)
    assert small.shape == (1, 300, 240, 3) and small.dtype == np.uint8
    empty = reliability_diagram_image(
        ExpectedCalibrationError().reliability_diagram())
    assert empty.shape == (1, 600, 480, 3)
    assert pyplot.get_fignums() == []
    # Valid for tf.summary.image.
    assert tf.io.decode_png(tf.io.encode_png(image[0])).shape == (600, 480, 3)


def _reddish(image):
    r, g, b = (image[0, ..., i].astype(int) for i in range(3))
    return (r - np.maximum(g, b) > 40).mean()


def test_reliability_diagram_image_shows_the_gap():
    calibrated, overconfident = _calibrated_and_overconfident()
    # Calibrated: bars reach the diagonal, only the legend's "Gap" patch is
    # red. Overconfident (accuracy 0): red gaps fill the used bins.
    assert _reddish(reliability_diagram_image(calibrated)) < 0.005
    assert _reddish(reliability_diagram_image(overconfident)) > 0.05


def test_reliability_diagram_histogram_bars_follow_bin_shares():
    # One sample at confidence 0.65 (bin [0.6, 0.8)), three at 0.9 (bin
    # [0.8, 1]): the histogram's bars are 25% and 75% high.
    metric = ExpectedCalibrationError(num_bins=5)
    metric.update_state([0, 0, 0, 0],
                        np.float32([[0.65, 0.35]] + [[0.9, 0.1]] * 3))
    image = reliability_diagram_image(metric.reliability_diagram())[0]
    # Pixels of the histogram bars' face colour (#7d93b5), per column.
    bar_pixels = np.all(image == (0x7D, 0x93, 0xB5), axis=-1).sum(0)
    columns = np.flatnonzero(bar_pixels)
    # Two bars of equal width side by side: split the columns in the middle.
    middle = (columns[0] + columns[-1]) / 2
    left = bar_pixels[columns[columns < middle]].max()
    right = bar_pixels[columns[columns > middle]].max()
    assert left > 20
    assert right / left == pytest.approx(3, rel=0.06)


# ------------------------------------------------------------- inside Keras
def _tiny_model(metrics, jit_compile):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="softmax")]
    )
    # learning_rate 0: fit's history is then the metric of fixed weights.
    model.compile(
        keras.optimizers.SGD(learning_rate=0.0),
        "sparse_categorical_crossentropy",
        metrics=metrics,
        jit_compile=jit_compile,
    )
    return model


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32) * 2
    return x, rng.integers(0, 3, 50)


def test_compile_fit_evaluate_jit():
    x, y = _data()
    model = _tiny_model(
        [ExpectedCalibrationError(num_bins=5), NegativeLogLikelihood(),
         BrierScore()],
        jit_compile=True,
    )
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    logs = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    probs = model.predict(x, verbose=0)
    want = {
        "expected_calibration_error": expected_calibration_error_numpy(
            probs, y, num_bins=5),
        "negative_log_likelihood": nll_sklearn(probs, y),
        "brier_score": brier_numpy(probs, y),
    }
    for name, value in want.items():
        assert history[name][0] == pytest.approx(value, abs=1e-5), name
        assert logs[name] == pytest.approx(value, abs=1e-5), name
    assert logs["negative_log_likelihood"] == pytest.approx(logs["loss"],
                                                            rel=1e-5)


def test_weighted_metrics_get_sample_weight():
    x, y = _data()
    weights = np.random.default_rng(1).uniform(0, 2, len(y))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="softmax")]
    )
    model.compile(loss="sparse_categorical_crossentropy", jit_compile=True,
                  weighted_metrics=[ExpectedCalibrationError(num_bins=5)])
    logs = model.evaluate(x, y, sample_weight=weights, batch_size=8,
                          verbose=0, return_dict=True)
    probs = model.predict(x, verbose=0)
    assert logs["expected_calibration_error"] == pytest.approx(
        expected_calibration_error_numpy(probs, y, 5, weights), abs=1e-5)


def test_mirrored_strategy_matches_single_device():
    x, y = _data()
    metrics = lambda: [ExpectedCalibrationError(num_bins=5),  # noqa: E731
                       NegativeLogLikelihood(), BrierScore()]
    single = _tiny_model(metrics(), jit_compile=False)
    want = single.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)

    with mirrored_strategy().scope():
        # Keras 3.15 cannot XLA-compile a multi-device step (a variable on
        # another device); jit_compile="auto" turns XLA off here too.
        mirrored = _tiny_model(metrics(), jit_compile=False)
    mirrored.set_weights(single.get_weights())
    got = mirrored.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    for name in ("expected_calibration_error", "negative_log_likelihood",
                 "brier_score"):
        assert got[name] == pytest.approx(want[name], abs=1e-6), name

    # Outside the replica context the bin sums are added over replicas.
    ece = next(m for m in mirrored.metrics[-1].metrics
               if isinstance(m, ExpectedCalibrationError))
    assert ece.reliability_diagram()["count"].sum() == pytest.approx(50)


def test_compiled_metrics_survive_keras_save(tmp_path):
    x, y = _data()
    model = _tiny_model([ExpectedCalibrationError(num_bins=5), BrierScore()],
                        jit_compile=False)
    want = model.evaluate(x, y, verbose=0, return_dict=True)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.evaluate(x, y, verbose=0, return_dict=True) == want
    ece = loaded.metrics[-1].metrics[0]
    assert isinstance(ece, ExpectedCalibrationError) and ece.num_bins == 5
