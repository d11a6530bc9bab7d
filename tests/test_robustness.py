"""Input corruptions and the robustness evaluation, against numpy, scipy and
PIL references; CIFAR-10-C through mocked TFDS (offline)."""

import colorsys
import json

import keras
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
from PIL import Image

from tests.events import read_scalars
from tests.mock_tfds import mocked_tfds
from topk_sparse import SparseMLP, robustness
from topk_sparse.sparsity import metric_state
from topk_sparse.data import corruptions
from topk_sparse.data.corruptions import CORRUPTIONS, corrupt

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"}


def _images(shape, seed=0):
    """Images in [0, 1] with smooth structure and some texture."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((shape[0], 4, 4, shape[3])).astype(np.float32)
    smooth = tf.image.resize(coarse, shape[1:3], "bilinear").numpy()
    texture = 0.1 * rng.standard_normal(shape).astype(np.float32)
    return np.clip(smooth + texture, 0.0, 1.0)


def _change(images, name, severity, seed=0):
    return float(np.mean(np.abs(corrupt(images, name, severity, seed)
                                - images)))


# Every corruption.

@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_keeps_shape_dtype_range_and_grows_with_severity(name):
    for shape in [(3, 8, 8, 1), (2, 16, 16, 3)]:
        x = _images(shape)
        out = corrupt(x, name, 5, seed=3)
        assert out.shape == shape and out.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(out))
        assert float(tf.reduce_max(out)) <= 1.0
        np.testing.assert_array_equal(out, corrupt(x, name, 5, seed=3))
        seeded_apart = not np.array_equal(out, corrupt(x, name, 5, seed=4))
        assert seeded_apart == (name in RANDOM)
        assert _change(x, name, 5) > _change(x, name, 1) > 0.0 or (
            name == "impulse_noise" and _change(x, name, 5) > 0.0)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_runs_in_tf_function_and_tf_data(name):
    x = _images((5, 16, 16, 3))
    expected = corrupt(x[:2], name, 3, seed=(1, 2))
    dynamic = tf.function(
        lambda images: corrupt(images, name, 3, seed=(1, 2)),
        input_signature=[tf.TensorSpec([None, None, None, 3])])
    np.testing.assert_allclose(dynamic(x[:2]), expected, atol=1e-6)
    assert dynamic(x[:1]).shape == (1, 16, 16, 3)
    ds = tf.data.Dataset.from_tensor_slices(x).batch(2).map(
        lambda images: corrupt(images, name, 3, seed=(1, 2)))
    batches = list(ds)
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_allclose(batches[0], expected, atol=1e-6)


def test_other_float_dtypes_are_kept():
    x = _images((2, 8, 8, 1)).astype(np.float64)
    assert corrupt(x, "contrast", 2).dtype == tf.float64
    half = corrupt(tf.constant(x, tf.float16), "gaussian_noise", 2)
    assert half.dtype == tf.float16


# Against references.

def test_noise_statistics_follow_the_severity_tables():
    x = np.full((4, 32, 32, 3), 0.5, np.float32)
    for severity in (1, 5):
        sigma = corruptions.gaussian_noise.parameters[severity - 1]
        noise = corrupt(x, "gaussian_noise", severity).numpy() - 0.5
        assert abs(noise.std() / sigma - 1) < 0.05
        assert abs(noise.mean()) < 0.1 * sigma
        photons = corruptions.shot_noise.parameters[severity - 1]
        shot = corrupt(x, "shot_noise", severity).numpy()
        assert abs(shot.mean() - 0.5) < 0.01  # Poisson: mean x, var x / c
        assert abs(shot.var() / (0.5 / photons) - 1) < 0.1
        amount = corruptions.impulse_noise.parameters[severity - 1]
        impulse = corrupt(x, "impulse_noise", severity).numpy()
        flipped = impulse != 0.5
        assert set(np.unique(impulse[flipped])) <= {0.0, 1.0}
        assert abs(flipped.mean() / amount - 1) < 0.2
        assert abs((impulse[flipped] == 1.0).mean() - 0.5) < 0.1


def _hendrycks_disk(radius, alias_blur):
    """make_cifar_c.py's `disk`, with scipy in place of cv2.GaussianBlur."""
    grid = np.arange(-8, 8 + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
    taps /= taps.sum()  # cv2.getGaussianKernel(3, alias_blur)
    return scipy.ndimage.correlate(disk, np.outer(taps, taps),
                                   mode="mirror")


@pytest.mark.parametrize("severity", [1, 4, 5])
def test_blurs_match_scipy(severity):
    x = _images((2, 8, 8, 3))
    radius, alias_blur = corruptions.defocus_blur.parameters[severity - 1]
    # cv2.filter2D's default border is BORDER_REFLECT_101, scipy's "mirror".
    expected = scipy.ndimage.correlate(
        x, _hendrycks_disk(radius, alias_blur)[None, :, :, None],
        mode="mirror")
    np.testing.assert_allclose(corrupt(x, "defocus_blur", severity),
                               np.clip(expected, 0, 1), atol=1e-5)
    sigma = corruptions.gaussian_blur.parameters[severity - 1]
    expected = scipy.ndimage.gaussian_filter(
        x, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(corrupt(x, "gaussian_blur", severity),
                               np.clip(expected, 0, 1), atol=1e-5)


@pytest.mark.parametrize("height,width", [(32, 32), (17, 9), (8, 8)])
def test_pixelate_matches_pil_box_resizes(height, width):
    x = _images((2, height, width, 1))
    for severity in corruptions.SEVERITIES:
        scale = corruptions.pixelate.parameters[severity - 1]
        small = (max(int(width * scale), 1), max(int(height * scale), 1))
        expected = [
            np.asarray(Image.fromarray(image[..., 0], mode="F")
                       .resize(small, Image.BOX)
                       .resize((width, height), Image.BOX))
            for image in x]
        np.testing.assert_allclose(corrupt(x, "pixelate", severity)[..., 0],
                                   np.stack(expected), atol=1e-5)


def test_contrast_and_brightness_by_hand():
    x = _images((2, 8, 8, 3))
    mean = x.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(corrupt(x, "contrast", 5),
                               (x - mean) * 0.15 + mean, atol=1e-6)
    # Brightness adds to the HSV value, keeping hue and saturation.
    pixel = np.array([[[[0.2, 0.4, 0.6]]]], np.float32)
    np.testing.assert_allclose(corrupt(pixel, "brightness", 5)[0, 0, 0],
                               [0.3, 0.6, 0.9], atol=1e-6)
    for rgb in x[0, :2, :2].reshape(-1, 3):
        hue, saturation, value = colorsys.rgb_to_hsv(*rgb)
        expected = colorsys.hsv_to_rgb(hue, saturation, min(value + 0.1, 1))
        np.testing.assert_allclose(
            corrupt(rgb[None, None, None], "brightness", 2)[0, 0, 0],
            expected, atol=1e-5)
    gray = _images((2, 8, 8, 1))
    np.testing.assert_allclose(corrupt(gray, "brightness", 3),
                               np.minimum(gray + 0.15, 1), atol=1e-6)


def test_jpeg_quality_falls_with_severity():
    x = _images((2, 16, 16, 3))
    errors = [_change(x, "jpeg_compression", s) for s in (1, 3, 5)]
    assert 0 < errors[0] < errors[1] < errors[2] < 0.1


# Bad input.

def test_bad_arguments_say_what_to_do():
    x = _images((2, 8, 8, 1))
    with pytest.raises(ValueError, match="Unknown corruption 'fog'.*"
                                         "gaussian_noise"):
        corrupt(x, "fog", 1)
    for severity in (0, 6, 2.0, True, "3"):
        with pytest.raises(ValueError,
                           match=r"severity must be an int in \[1, 5\]"):
            corrupt(x, "contrast", severity)
    with pytest.raises(ValueError, match=r"add a batch axis.*images\[None\]"):
        corrupt(x[0], "contrast", 1)
    with pytest.raises(ValueError, match="dtype uint8.*convert_image_dtype"):
        corrupt((x * 255).astype(np.uint8), "contrast", 1)
    with pytest.raises(ValueError, match="1 \\(gray\\) or 3 \\(RGB\\)"):
        corrupt(np.zeros((1, 8, 8, 4), np.float32), "contrast", 1)
    with pytest.raises(ValueError, match="seed must be an int or a pair"):
        corrupt(x, "gaussian_noise", 1, seed=0.5)
    with pytest.raises(ValueError, match="seed must be an int or a pair"):
        corrupt(x, "gaussian_noise", 1, seed=(1, 2, 3))


# Evaluation.

def _linear_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(4)])


def _ece_numpy(logits, labels, num_bins=15):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    confidence = probs.max(-1).astype(np.float32)
    correct = probs.argmax(-1) == labels
    bins = np.minimum(np.floor(confidence * np.float32(num_bins)),
                      num_bins - 1)
    return sum(abs(correct[bins == b].sum() - confidence[bins == b].sum())
               for b in range(num_bins)) / len(labels)


def test_evaluate_corruptions_matches_numpy():
    model = _linear_model()
    kernel, bias = (w.numpy() for w in model.weights)
    x = _images((12, 8, 8, 1), seed=1)
    labels = (x.reshape(12, -1) @ kernel + bias).argmax(-1).astype(np.int32)
    labels[:3] = (labels[:3] + 1) % 4  # three clean mistakes
    batches = [(x[:8], labels[:8]), (x[8:], labels[8:])]  # sizes 8 and 4
    result = robustness.evaluate_corruptions(
        model, batches, corruptions=["gaussian_noise", "contrast"],
        severities=(1, 5), seed=7)

    def reference(transform):
        logits = np.concatenate([
            transform(images, i).numpy().reshape(len(images), -1) @ kernel
            for i, (images, _) in enumerate(batches)]) + bias
        return {"accuracy": np.mean(logits.argmax(-1) == labels),
                "expected_calibration_error": _ece_numpy(logits, labels)}

    clean = reference(lambda images, i: tf.constant(images))
    assert clean["accuracy"] == 0.75
    for name in ("gaussian_noise", "contrast"):
        for severity in (1, 5):
            # Batch i is corrupted with the stateless seed (seed, i).
            expected = reference(lambda images, i: corrupt(
                images, name, severity, seed=(7, i)))
            for metric, value in expected.items():
                assert result["corruptions"][name][str(severity)][metric] \
                    == pytest.approx(value, abs=1e-5)
    for metric, value in clean.items():
        assert result["clean"][metric] == pytest.approx(value, abs=1e-5)
    scores = [result["corruptions"][n][s] for n in ("gaussian_noise",
                                                    "contrast")
              for s in ("1", "5")]
    assert result["mean"]["accuracy"] == pytest.approx(
        np.mean([s["accuracy"] for s in scores]))
    assert result["corruptions"]["contrast"]["mean"][
        "expected_calibration_error"] == pytest.approx(np.mean(
            [result["corruptions"]["contrast"][s][
                "expected_calibration_error"] for s in ("1", "5")]))
    assert json.loads(json.dumps(result)) == result


def test_default_evaluation_covers_everything_and_keeps_sparsity_state():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Reshape((8, 8)),
        SparseMLP(mlp_dim=16, k=4), keras.layers.Flatten(),
        keras.layers.Dense(3)])
    x = _images((6, 8, 8, 1))
    model(x)  # some sparsity statistics of "training"
    before = [v.numpy() for v in metric_state(model)]
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, np.arange(6) % 3)).batch(4)
    result = robustness.evaluate_corruptions(model, dataset)
    for variable, value in zip(metric_state(model), before):
        np.testing.assert_array_equal(variable.numpy(), value)
    assert set(result) == {"clean", "corruptions", "mean"}
    assert list(result["corruptions"]) == list(CORRUPTIONS)
    for scores in result["corruptions"].values():
        assert list(scores) == ["1", "2", "3", "4", "5", "mean"]
        for score in scores.values():
            assert set(score) == set(robustness.METRICS)
            assert 0 <= score["accuracy"] <= 1
            assert 0 <= score["expected_calibration_error"] <= 1
    table = robustness.format_table(result).splitlines()
    assert len(table) == 2 + len(CORRUPTIONS) + 1
    assert table[1].split() == ["corruption", "1", "2", "3", "4", "5",
                                "mean"]


def test_evaluate_corruptions_rejects_bad_arguments():
    model = _linear_model()
    batches = [(_images((2, 8, 8, 1)), np.array([0, 1]))]
    with pytest.raises(ValueError, match="names from .*'gaussian_noise'"):
        robustness.evaluate_corruptions(model, batches, ["fog"])
    with pytest.raises(ValueError, match="distinct ints from 1 to 5"):
        robustness.evaluate_corruptions(model, batches, severities=(1, 1))
    with pytest.raises(ValueError, match="severity must be an int"):
        robustness.evaluate_corruptions(model, batches, severities=(0,))
    with pytest.raises(ValueError, match=r"yield \(images, labels\) batches, "
                                         "got a tuple of 3 items"):
        robustness.evaluate_corruptions(
            model, [(*batches[0], np.ones(2))], ["contrast"])
    with pytest.raises(ValueError, match="yielded no batches"):
        robustness.evaluate_corruptions(model, [], ["contrast"])


def _score(accuracy, ece):
    return {"accuracy": accuracy, "expected_calibration_error": ece}


HANDMADE = {
    "clean": _score(0.9, 0.05),
    "corruptions": {
        "contrast": {"1": _score(0.8, 0.1), "5": _score(0.4, 0.3),
                     "mean": _score(0.6, 0.2)},
        "gaussian_noise": {"1": _score(0.7, 0.1), "5": _score(0.2, 0.5),
                           "mean": _score(0.45, 0.3)}},
    "mean": _score(0.525, 0.25),
}


def test_format_table_rows_columns_and_cells():
    lines = robustness.format_table(HANDMADE).splitlines()
    assert lines[0].startswith("clean: 90.0/5.0")
    assert lines[1].split() == ["corruption", "1", "5", "mean"]
    assert lines[2].split() == ["contrast", "80.0/10.0", "40.0/30.0",
                                "60.0/20.0"]
    assert lines[3].split() == ["gaussian_noise", "70.0/10.0", "20.0/50.0",
                                "45.0/30.0"]
    assert lines[4].split() == ["mean", "75.0/10.0", "30.0/40.0",
                                "52.5/25.0"]
    with pytest.raises(ValueError, match="keys 'clean', 'corruptions'"):
        robustness.format_table({"accuracy": 1.0})


def test_write_summaries_tags_read_back(tmp_path):
    robustness.write_summaries(HANDMADE, tmp_path, step=7)
    assert len(list(tmp_path.iterdir())) == 1  # one file writer
    scalars = read_scalars(tmp_path)
    assert {step for steps in scalars.values() for step in steps} == {7}
    values = {tag: steps[7] for tag, steps in scalars.items()}
    assert values == pytest.approx({
        "robustness/clean/accuracy": 0.9,
        "robustness/clean/expected_calibration_error": 0.05,
        "robustness/contrast/accuracy": 0.6,
        "robustness/contrast/expected_calibration_error": 0.2,
        "robustness/gaussian_noise/accuracy": 0.45,
        "robustness/gaussian_noise/expected_calibration_error": 0.3,
        "robustness/mean/accuracy": 0.525,
        "robustness/mean/expected_calibration_error": 0.25})


# CIFAR-10-C from TFDS, offline.

@pytest.fixture
def prepared_data_dir(tmp_path):
    """cifar10 and two CIFAR-10-C configs look prepared (metadata only);
    `tfds.testing.mock_data` makes up the records."""
    names = ("cifar10", "cifar10_corrupted/gaussian_noise_2",
             "cifar10_corrupted/frosted_glass_blur_5")
    with mocked_tfds(tmp_path, names) as data_dir:
        yield data_dir


def test_load_cifar10_corrupted(prepared_data_dir):
    ds, num_examples = corruptions.load_cifar10_corrupted(
        "gaussian_noise", 2, 4, data_dir=prepared_data_dir)
    assert num_examples == 6
    batches = list(ds)
    assert [int(y.shape[0]) for _, y in batches] == [4, 2]  # none dropped
    x, y = batches[0]
    assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32
    assert y.dtype == tf.int32
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    # The paper's name of TFDS's frosted_glass_blur; resized on request.
    ds, _ = corruptions.load_cifar10_corrupted(
        "glass_blur", 5, 8, data_dir=prepared_data_dir, image_size=16)
    assert ds.element_spec[0].shape[1:] == (16, 16, 3)


def test_evaluate_cifar10_c(prepared_data_dir):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(10)])
    result = robustness.evaluate_cifar10_c(
        model, 4, data_dir=prepared_data_dir, corruptions=["gaussian_noise"],
        severities=[2])
    assert list(result["corruptions"]) == ["gaussian_noise"]
    assert list(result["corruptions"]["gaussian_noise"]) == ["2", "mean"]
    assert 0 <= result["mean"]["accuracy"] <= 1
    assert json.loads(json.dumps(result)) == result
    with pytest.raises(ValueError, match="names from .*'snow'"):
        robustness.evaluate_cifar10_c(model, 4, corruptions=["blizzard"])


def test_missing_cifar10_c_names_config_and_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        corruptions.load_cifar10_corrupted("gaussian_noise", 1, 8,
                                           data_dir=str(tmp_path))
    message = str(error.value)
    assert "'cifar10_corrupted/gaussian_noise_1'" in message
    assert str(tmp_path) in message
    assert "tfds build cifar10_corrupted/gaussian_noise_1" in message
    assert not list(tmp_path.iterdir()), "nothing may be downloaded"
    with pytest.raises(ValueError, match="Unknown CIFAR-10-C corruption"):
        corruptions.load_cifar10_corrupted("blizzard", 1, 8,
                                           data_dir=str(tmp_path))
