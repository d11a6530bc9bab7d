"""Input pipelines: embedded digits, TFDS (mocked, offline), synthetic and
C4 seq2seq."""

import numpy as np
import pytest
import tensorflow as tf

from tests.mock_tfds import mocked_tfds
from topk_sparse import data
from topk_sparse.data import images, random_images, text


def _first(ds):
    return next(iter(ds))


# Digits (ships with scikit-learn).

def test_digits_train_batches_are_static_scaled_and_resized():
    ds, num_examples = images.load("digits", "train", 32, train=True,
                                   image_size=16)
    assert num_examples == 1437
    x_spec, y_spec = ds.element_spec
    assert x_spec.shape == (32, 16, 16, 1) and x_spec.dtype == tf.float32
    assert y_spec.shape == (32,) and y_spec.dtype == tf.int32
    x, y = _first(ds)
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    assert set(y.numpy()) <= set(range(10))


def test_digits_test_split_is_fixed_complete_and_disjoint():
    ds, num_examples = images.load("digits", "test", 64, train=False)
    labels = np.concatenate([y for _, y in ds])
    assert num_examples == len(labels) == 360
    again = np.concatenate([y for _, y in
                            images.load("digits", "test", 64, train=False)[0]])
    np.testing.assert_array_equal(labels, again)
    # Stratified: every class has 20% of its images in the test split.
    assert np.bincount(labels).min() >= 35
    x_train, _ = images.digits_arrays("train")
    x_test, _ = images.digits_arrays("test")
    train_rows = {row.tobytes() for row in x_train}
    assert sum(row.tobytes() in train_rows for row in x_test) < 10  # dupes


def test_digits_shuffle_follows_the_seed():
    def first_labels(seed):
        ds, _ = images.load("digits", "train", 16, train=True, seed=seed)
        return _first(ds)[1].numpy()

    np.testing.assert_array_equal(first_labels(1), first_labels(1))
    assert not np.array_equal(first_labels(1), first_labels(2))


def test_label_noise_is_uniform_and_fixed_per_example():
    noise = images._label_noise_fn(num_classes=10, fraction=0.4, seed=3)
    ids = tf.range(4000, dtype=tf.int64)
    clean = tf.zeros([4000], tf.int32)
    _, noisy, _ = tf.vectorized_map(lambda a: noise(*a), (ids, clean, ids))
    _, again, _ = tf.vectorized_map(lambda a: noise(*a), (ids, clean, ids))
    np.testing.assert_array_equal(noisy, again)
    # 40% redrawn uniformly over 10 classes: 36% end up changed.
    assert 0.33 < np.mean(noisy.numpy() != 0) < 0.39
    assert set(noisy.numpy()) == set(range(10))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown image dataset 'mnist'"):
        images.load("mnist", "train", 8, train=True)
    with pytest.raises(ValueError, match="label_noise"):
        images.load("digits", "train", 8, train=True, label_noise=1.5)
    with pytest.raises(ValueError, match="Unknown dataset 'c5'"):
        data.load({"name": "c5"}, "train", 8, train=True)


# TFDS datasets, offline.

@pytest.fixture
def prepared_data_dir(tmp_path):
    """A data_dir where cifar10, imagenet2012 and c4 look prepared
    (metadata only), with every record mocked by `tfds.testing.mock_data`."""
    with mocked_tfds(tmp_path, ("cifar10", "imagenet2012", "c4")) as data_dir:
        yield data_dir


def test_cifar10_from_tfds(prepared_data_dir):
    config = {"name": "cifar10", "data_dir": prepared_data_dir,
              "label_noise": 0.5}
    ds, num_examples = data.load(config, "train", 4, train=True)
    assert num_examples == 6
    x, y = _first(ds)
    assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32
    assert y.dtype == tf.int32
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    ds, _ = images.load("cifar10", "test", 4, train=False, image_size=16,
                        data_dir=prepared_data_dir)
    assert [int(y.shape[0]) for _, y in ds] == [4, 2]  # no example dropped
    assert ds.element_spec[0].shape[1:] == (16, 16, 3)


@pytest.mark.parametrize("train", [True, False])
def test_imagenet_crops_to_image_size(prepared_data_dir, train):
    ds, _ = images.load("imagenet2012", "train" if train else "test", 2,
                        train=train, image_size=24,
                        data_dir=prepared_data_dir)
    x, y = _first(ds)
    assert x.shape == (2, 24, 24, 3)
    assert 0 <= int(tf.reduce_min(y)) and int(tf.reduce_max(y)) < 1000


def test_missing_tfds_dataset_names_it_and_the_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        images.load("cifar10", "train", 8, train=True,
                    data_dir=str(tmp_path))
    message = str(error.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert "tfds build cifar10" in message
    assert not list(tmp_path.iterdir()), "nothing may be downloaded"


# Synthetic seq2seq.

def _strip(tokens):
    """Content tokens before EOS."""
    tokens = list(tokens)
    return tokens[:tokens.index(text.EOS_ID)]


@pytest.mark.parametrize("task,transform", [
    ("sort", sorted), ("reverse", lambda t: t[::-1]), ("copy", list)])
def test_synthetic_targets_and_shifted_decoder_inputs(task, transform):
    ds, num_examples = text.load_synthetic(
        "train", 8, train=True, task=task, vocab_size=20, min_length=2,
        max_length=6)
    assert num_examples is None
    inputs, targets, weights = _first(ds)
    for tensor in (inputs["encoder_tokens"], inputs["decoder_tokens"],
                   targets, weights):
        assert tensor.shape == (8, 7)
    assert inputs["encoder_tokens"].dtype == tf.int32
    for source, target, decoder, weight in zip(
            inputs["encoder_tokens"].numpy(), targets.numpy(),
            inputs["decoder_tokens"].numpy(), weights.numpy()):
        content = _strip(source)
        assert 2 <= len(content) <= 6
        assert min(content) >= text.FIRST_CONTENT_ID and max(content) < 20
        assert _strip(target) == transform(content)
        assert decoder[0] == text.DECODER_START_ID
        np.testing.assert_array_equal(decoder[1:], target[:-1])
        np.testing.assert_array_equal(weight, target != text.PAD_ID)
        assert weight.sum() == len(content) + 1  # EOS is predicted too


def test_synthetic_is_seeded_and_splits_differ():
    def encoder(split, seed, train=True):
        ds, _ = text.load_synthetic(split, 4, train=train, seed=seed)
        return _first(ds)[0]["encoder_tokens"].numpy()

    np.testing.assert_array_equal(encoder("train", 0), encoder("train", 0))
    assert not np.array_equal(encoder("train", 0), encoder("train", 1))
    assert not np.array_equal(encoder("train", 0), encoder("test", 0))
    ds, num_examples = data.load(
        {"name": "synthetic", "num_eval_examples": 10}, "test", 4,
        train=False)
    assert num_examples == 10
    assert [int(t.shape[0]) for _, t, _ in ds] == [4, 4, 2]


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="Unknown synthetic task 'shuffle'"):
        text.load_synthetic("train", 4, train=True, task="shuffle")
    with pytest.raises(ValueError, match="min_length <= max_length"):
        text.load_synthetic("train", 4, train=True, min_length=5,
                            max_length=3)


# C4 span corruption (mocked, offline).

def _uncorrupt(inputs, targets):
    """The original chunk: each sentinel in `inputs` replaced by its span."""
    spans, current = {}, None
    for token in _strip(targets):
        if token >= text.BYTE_VOCAB_SIZE - text.NUM_SENTINELS:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    chunk = []
    for token in _strip(inputs):
        chunk += spans.pop(token, [token])
    assert not spans
    return chunk


def test_c4_span_corruption_is_static_and_reversible(prepared_data_dir):
    ds, num_examples = data.load(
        {"name": "c4", "data_dir": prepared_data_dir, "input_length": 60,
         "mean_noise_span_length": 3.0, "shuffle_buffer": 8}, "train", 4,
        train=True)
    assert num_examples is None
    # 60 tokens: 9 noise tokens in 3 spans; EOS appended to both sides.
    inputs, targets, weights = _first(ds)
    assert inputs["encoder_tokens"].shape == (4, 60 - 9 + 3 + 1)
    assert inputs["decoder_tokens"].shape == targets.shape == (4, 9 + 3 + 1)
    assert float(tf.reduce_min(weights)) == 1.0  # never padded
    sentinels = set(range(text.BYTE_VOCAB_SIZE - 3, text.BYTE_VOCAB_SIZE))
    chunks = []
    for source, target in zip(inputs["encoder_tokens"].numpy(),
                              targets.numpy()):
        assert set(_strip(target)) & sentinels == sentinels
        chunk = _uncorrupt(source, target)
        assert len(chunk) == 60
        assert all(text.BYTE_OFFSET <= t < text.BYTE_OFFSET + 256
                   for t in chunk)
        chunks.append(chunk)
    # Consecutive chunks of one packed byte stream differ.
    assert chunks[0] != chunks[1]


def test_c4_eval_split_is_finite(prepared_data_dir):
    ds, num_examples = text.load_c4("test", 4, train=False,
                                    data_dir=prepared_data_dir,
                                    input_length=10, num_eval_examples=5)
    assert num_examples == 5
    assert [int(t.shape[0]) for _, t, _ in ds] == [4, 1]


def test_noise_mask_counts():
    mask = text.random_spans_noise_mask(100, 15, 5, tf.constant([3, 4],
                                                                tf.int64))
    mask = mask.numpy()
    assert mask.sum() == 15 and not mask[0]
    starts = np.flatnonzero(mask[1:] & ~mask[:-1])
    assert len(starts) == 5
    with pytest.raises(ValueError, match="sentinels"):
        text._noise_counts(10_000, 0.5, 3)


def test_random_images_are_noise_with_random_labels():
    load = random_images.load_random_images
    ds, n = load("train", 8, train=True, seed=3, image_size=6, channels=1,
                 num_examples=20)
    x, y = next(iter(ds))
    assert n == 20 and x.shape == (8, 6, 6, 1) and y.shape == (8,)
    assert 0 <= float(np.min(x)) and float(np.max(x)) <= 1
    test_ds, test_n = load("test", 4, train=False, num_examples=20)
    assert test_n == 5 and sum(len(b[1]) for b in test_ds) == 5
