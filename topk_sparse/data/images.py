"""Image classification input pipelines: `(images, labels)` batches.

Images are float32 `[batch, height, width, channels]` scaled to [0, 1];
labels are int32 `[batch]`.

- `"digits"`: scikit-learn's handwritten digits (1,797 8x8 grayscale images,
  10 classes), which ship inside scikit-learn: the default that trains with
  no network in minutes on a CPU. A fixed stratified split keeps 20% for test.
- `"cifar10"`, `"imagenet2012"`: TFDS datasets read from `data_dir`. They are
  never downloaded here: a dataset that is not prepared raises an error that
  names it, the folder searched and the command that prepares it.

Training splits are shuffled with a seed, repeated, batched with
`drop_remainder=True` (static shapes for XLA and TPU, and the registered
gradient of `approx_max_k` needs them) and optionally get label noise, the
protocol of *The Lazy Neuron Phenomenon* (arXiv 2210.06313, Table 1): a
fraction `label_noise` of the training labels replaced by a class drawn
uniformly over all classes, fixed per example across epochs. Evaluation
splits keep every example (the last batch may be smaller).
"""

import functools

import numpy as np
import tensorflow as tf

from topk_sparse import registry

NUM_CLASSES = {"digits": 10, "cifar10": 10, "imagenet2012": 1000}
"""Classes per dataset name."""

DATASETS = tuple(NUM_CLASSES)

# The evaluation split of each dataset when asked for "test".
_TFDS_TEST_SPLIT = {"cifar10": "test", "imagenet2012": "validation"}

# ImageNet evaluation: the central crop of 87.5% of the shorter side, resized
# to image_size (the standard "resize to 256, crop 224" recipe).
_CENTRAL_CROP_FRACTION = 0.875


def load(name, split, batch_size, *, train, image_size=None, data_dir=None,
         seed=0, label_noise=0.0, shuffle_buffer=10_000, test_fraction=0.2):
    """An image classification split as a batched `tf.data.Dataset`.

    Args:
      name: str. One of `DATASETS`.
      split: str. `"train"` or `"test"` (`"test"` is ImageNet's validation
        split); TFDS datasets also take TFDS split strings (`"train[:90%]"`).
      batch_size: int. Global batch size.
      train: bool. Shuffle, augment, repeat forever and drop the partial last
        batch (True), or read every example once in order (False).
      image_size: int or None. Output height and width; None keeps the
        native size (8 for digits, 32 for CIFAR-10; required for ImageNet).
      data_dir: str or None. TFDS data folder; None is TFDS's default
        (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`). Unused for digits.
      seed: int. Seed of the shuffle, the augmentation and the label noise.
      label_noise: float in [0, 1]. Fraction of training labels replaced by
        a uniformly drawn class. Only applied when `train` is True.
      shuffle_buffer: int. Shuffle buffer of TFDS training splits.
      test_fraction: float. Share of digits held out for `"test"`.

    Returns:
      `(dataset, num_examples)`: the batched dataset and the number of
      examples in the split (None when unknown).
    """
    if name not in NUM_CLASSES:
        raise ValueError(
            f"Unknown image dataset {name!r}: choose one of {DATASETS}.")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}.")
    if name == "digits":
        ds, num_examples = _digits(split, image_size, test_fraction)
    else:
        ds, num_examples = _tfds(name, split, image_size, data_dir, train,
                                 seed, shuffle_buffer)
    if train:
        if name == "digits":
            ds = ds.shuffle(num_examples, seed=seed,
                            reshuffle_each_iteration=True)
        if label_noise:
            ds = ds.map(_label_noise_fn(NUM_CLASSES[name], label_noise, seed),
                        num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.repeat()
    ds = ds.map(lambda x, y, _: (x, y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.prefetch(tf.data.AUTOTUNE), num_examples


def digits_arrays(split, test_fraction=0.2):
    """Digits as numpy `(images [n, 8, 8, 1] in [0, 1], labels [n])`.

    The split is stratified and fixed (`random_state=0`): the same images
    are test images in every run.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(
            f"digits has splits 'train' and 'test', got {split!r}.")
    digits = load_digits()
    # Pixel values are counts 0..16 of a 4x4 block of a 32x32 bitmap.
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=0,
        stratify=labels)
    return (x_train, y_train) if split == "train" else (x_test, y_test)


def _digits(split, image_size, test_fraction):
    images, labels = digits_arrays(split, test_fraction)
    if image_size and image_size != images.shape[1]:
        images = tf.image.resize(images, (image_size, image_size)).numpy()
    ids = np.arange(len(labels), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((images, labels, ids))
    return ds, len(labels)


def _tfds(name, split, image_size, data_dir, train, seed, shuffle_buffer):
    import tensorflow_datasets as tfds

    builder = prepared_builder(name, data_dir)
    if split == "test":
        split = _TFDS_TEST_SPLIT[name]
    decode = name == "imagenet2012"  # crop before decoding the JPEG
    ds = builder.as_dataset(
        split=split, shuffle_files=train,
        decoders={"image": tfds.decode.SkipDecoding()} if decode else None,
        read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=True))
    num_examples = int(ds.cardinality())
    if train:
        ds = ds.shuffle(shuffle_buffer, seed=seed,
                        reshuffle_each_iteration=True)
    preprocess = (_imagenet_preprocess if decode else cifar_preprocess)(
        image_size, train, seed)
    ds = ds.map(
        lambda ex: (preprocess(ex["image"]), tf.cast(ex["label"], tf.int32),
                    tf.strings.to_hash_bucket_fast(ex["tfds_id"], 2**62)),
        num_parallel_calls=tf.data.AUTOTUNE)
    return ds, num_examples if num_examples >= 0 else None


def prepared_builder(name, data_dir=None):
    """`tfds.builder(name, data_dir)`, raising if it is not prepared there.

    Nothing is downloaded: preparing a dataset is a separate, explicit step.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        manual = ("; ImageNet needs its tar files in <data_dir>/downloads/"
                  "manual first" if name == "imagenet2012" else "")
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (version {builder.version}) is not "
            f"prepared in data_dir='{builder.data_dir_root}': no "
            f"{builder.data_path}. Prepare it with `tfds build {name} "
            f"--data_dir={builder.data_dir_root}`{manual}, or set "
            f"config.data.data_dir to the folder that holds it.")
    return builder


def cifar_preprocess(image_size, train, seed):
    """`image -> float32 [0, 1]`, resized to `image_size` if given; in
    training, a seeded random horizontal flip. Shared with CIFAR-10-C."""
    def preprocess(image):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if train:
            image = tf.image.random_flip_left_right(image, seed=seed)
        if image_size and image_size != image.shape[0]:
            image = tf.image.resize(image, (image_size, image_size))
        return image
    return preprocess


def _imagenet_preprocess(image_size, train, seed):
    if not image_size:
        raise ValueError("imagenet2012 needs an image_size (e.g. 224).")

    def preprocess(encoded):
        shape = tf.image.extract_jpeg_shape(encoded)
        if train:
            # Inception crop: a random box of 5%-100% of the area.
            begin, size, _ = tf.image.sample_distorted_bounding_box(
                shape, tf.zeros([0, 0, 4], tf.float32),
                area_range=(0.05, 1.0), aspect_ratio_range=(0.75, 1.33),
                min_object_covered=0, use_image_if_no_bounding_boxes=True,
                seed=seed)
            window = tf.stack([begin[0], begin[1], size[0], size[1]])
        else:
            side = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
            crop = tf.cast(side * _CENTRAL_CROP_FRACTION, tf.int32)
            window = tf.stack([(shape[0] - crop) // 2, (shape[1] - crop) // 2,
                               crop, crop])
        image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
        image = tf.image.resize(image, (image_size, image_size)) / 255.0
        if train:
            image = tf.image.random_flip_left_right(image, seed=seed)
        return tf.ensure_shape(image, (image_size, image_size, 3))
    return preprocess


def _label_noise_fn(num_classes, fraction, seed):
    """Replaces a label with a uniform class with probability `fraction`.

    Seeded by the example's id, so an example keeps the same (possibly
    noisy) label in every epoch, as a noisy dataset would.
    """
    def apply(image, label, example_id):
        key = tf.stack([tf.cast(seed, tf.int64), example_id])
        draw = tf.random.stateless_uniform([2], key)
        noisy = tf.cast(draw[1] * num_classes, tf.int32)
        label = tf.where(draw[0] < fraction, noisy, label)
        return image, label, example_id
    return apply


for _name, _classes in NUM_CLASSES.items():
    registry.register_dataset(
        _name, functools.partial(load, _name),
        features=lambda kwargs, classes=_classes: {"num_classes": classes})
