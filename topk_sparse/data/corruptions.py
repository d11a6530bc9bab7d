"""CIFAR-10-C input corruptions, as TensorFlow ops on image batches.

The Lazy Neuron paper (arXiv 2210.06313, Table 1) reports that Top-k MLPs
make a Transformer more robust to corrupted inputs. Hendrycks & Dietterich
(arXiv 1903.12261) define the benchmark: 15+4 corruptions at 5 severities.
This module applies ten of them on the fly, to any model's evaluation
batches (digits, CIFAR-10 at any size), and reads the published CIFAR-10-C
records from TFDS:

- `corrupt(images, name, severity, seed=0)`: images are a float
  `[batch, height, width, channels]` batch in [0, 1] with 1 or 3 channels;
  the result has the same shape and dtype, clipped to [0, 1]. Pure TF ops
  (stateless random ops), so it runs eagerly, in `tf.function` and in
  `tf.data` `map`, and the same seed gives the same corruption. `seed` is an
  int or a stateless seed pair: give each batch its own pair (e.g.
  `(seed, batch_index)`) so the noise differs between batches.
- `load_cifar10_corrupted(corruption, severity, batch_size)`: the TFDS
  `cifar10_corrupted/<corruption>_<severity>` test set, never downloaded.

Severity parameters are those of CIFAR-10-C, from `make_cifar_c.py` of
github.com/hendrycks/robustness (the code behind arXiv 1903.12261). Known
differences: the published files are 8-bit (`np.uint8` truncates), these
outputs are not quantized; JPEG goes through TF's libjpeg, not PIL.
"""

import numpy as np
import tensorflow as tf

from topk_sparse import checks

SEVERITIES = (1, 2, 3, 4, 5)
"""The benchmark's severity levels."""

# TFDS spells two corruptions differently from arXiv 1903.12261.
TFDS_ALIASES = {"glass_blur": "frosted_glass_blur",
                "elastic_transform": "elastic"}

TFDS_CORRUPTIONS = (
    "brightness", "contrast", "defocus_blur", "elastic", "fog", "frost",
    "frosted_glass_blur", "gaussian_blur", "gaussian_noise", "impulse_noise",
    "jpeg_compression", "motion_blur", "pixelate", "saturate", "shot_noise",
    "snow", "spatter", "speckle_noise", "zoom_blur")
"""Corruptions of TFDS `cifar10_corrupted` (configs `<name>_<severity>`)."""

BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
    "frosted_glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog",
    "brightness", "contrast", "elastic", "pixelate", "jpeg_compression")
"""The 15 corruptions of the CIFAR-10-C benchmark (Hendrycks & Dietterich,
arXiv 1903.12261), by their TFDS names; the other four are its extras."""


def check_severity(severity):
    """Returns `severity` as an int if it is one of `SEVERITIES`, else
    raises."""
    return checks.int_in_range(severity, "severity", SEVERITIES[0],
                               SEVERITIES[-1])


def _check_images(images):
    """Returns a float tensor [batch, height, width, 1 or 3], or raises."""
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ValueError(
            f"Corruptions take a batch [batch, height, width, channels], got "
            f"shape {images.shape}; add a batch axis to one image "
            f"(images[None]).")
    if not images.dtype.is_floating:
        raise ValueError(
            f"Corruptions take float images in [0, 1], got dtype "
            f"{images.dtype.name}; convert them with "
            f"tf.image.convert_image_dtype(images, tf.float32).")
    if images.shape[-1] not in (1, 3):
        raise ValueError(
            f"Corruptions take 1 (gray) or 3 (RGB) channels, a known number, "
            f"got shape {images.shape}.")
    return images


def _stateless_seed(seed):
    """An int or an int pair (Python or tensor) as an int64 [2] seed."""
    if isinstance(seed, (bool, float, str)):
        raise ValueError(
            f"seed must be an int or a pair of ints, got {seed!r}.")
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer or seed.shape.rank not in (0, 1) or (
            seed.shape.rank == 1 and seed.shape[0] != 2):
        raise ValueError(
            f"seed must be an int or a pair of ints, got {seed!r}.")
    seed = tf.cast(seed, tf.int64)
    return tf.stack([seed, tf.zeros_like(seed)]) if seed.shape.rank == 0 \
        else seed


def _corruption(**table):
    """Makes `fn(images, param, seed)` the corruption `fn(images, severity,
    seed=0)`, `param` being the entry of `table` for that severity."""
    (param, values), = table.items()

    def decorate(fn):
        def apply(images, severity, seed=0):
            images = _check_images(images)
            severity = check_severity(severity)
            seed = _stateless_seed(seed)
            x = tf.cast(images, tf.float32)
            out = fn(x, values[severity - 1], seed)
            out = tf.ensure_shape(tf.clip_by_value(out, 0.0, 1.0),
                                  images.shape)
            return tf.cast(out, images.dtype)

        # Not functools.wraps: the public signature is (images, severity).
        apply.__name__ = apply.__qualname__ = fn.__name__
        apply.__doc__ = (f"{fn.__doc__}\n\n    Severities 1-5: {param} = "
                         f"{values}. See `corrupt` for the arguments.\n")
        apply.parameters = values
        return apply
    return decorate


# Severity tables below are CIFAR-10-C's: make_cifar_c.py of
# github.com/hendrycks/robustness (Hendrycks & Dietterich, arXiv 1903.12261).

# Noise.

@_corruption(sigma=(0.04, 0.06, 0.08, 0.09, 0.10))
def gaussian_noise(x, sigma, seed):
    """Adds independent N(0, sigma^2) noise to every value."""
    return x + sigma * tf.random.stateless_normal(tf.shape(x), seed)


@_corruption(photons=(500, 250, 100, 75, 50))
def shot_noise(x, photons, seed):
    """Poisson photon noise: `Poisson(x * photons) / photons`."""
    counts = tf.random.stateless_poisson(tf.shape(x), seed, lam=x * photons,
                                         dtype=tf.float32)
    return counts / photons


@_corruption(amount=(0.01, 0.02, 0.03, 0.05, 0.07))
def impulse_noise(x, amount, seed):
    """Salt and pepper: a share `amount` of values set to 0 or 1 (even odds).

    Value by value, as `skimage.util.random_noise(mode="s&p")`.
    """
    shape = tf.shape(x)
    flip = tf.random.stateless_uniform(
        shape, tf.random.experimental.stateless_fold_in(seed, 1)) < amount
    salt = tf.random.stateless_uniform(
        shape, tf.random.experimental.stateless_fold_in(seed, 2)) < 0.5
    return tf.where(flip, tf.cast(salt, x.dtype), x)


@_corruption(sigma=(0.06, 0.1, 0.12, 0.16, 0.2))
def speckle_noise(x, sigma, seed):
    """Multiplicative noise: `x + x * N(0, sigma^2)`."""
    return x + x * sigma * tf.random.stateless_normal(tf.shape(x), seed)


# Blur.

def _pad(x, pad, mode):
    """Pads height and width by `pad`; works for dynamic and tiny sizes.

    "reflect" is cv2's default border (`dcb|abcd|cba`, BORDER_REFLECT_101),
    "nearest" scipy.ndimage's (`aaa|abcd|ddd`), skimage `gaussian`'s default.
    """
    for axis in (1, 2):
        size = tf.shape(x)[axis]
        index = tf.range(-pad, size + pad)
        if mode == "reflect":
            index = (size - 1) - tf.abs(size - 1 - tf.abs(index))
        # Also folds a pad wider than the image back inside it.
        x = tf.gather(x, tf.clip_by_value(index, 0, size - 1), axis=axis)
    return x


def _filter(x, kernel, mode):
    """Correlates every channel of `x` with the odd square `kernel`."""
    pad = kernel.shape[0] // 2
    kernel = np.tile(kernel[:, :, None, None], [1, 1, x.shape[-1], 1])
    return tf.nn.depthwise_conv2d(_pad(x, pad, mode),
                                  tf.constant(kernel, tf.float32),
                                  strides=[1, 1, 1, 1], padding="VALID")


def _gaussian_taps(sigma, radius):
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def _disk_kernel(radius, alias_blur):
    """Hendrycks' `disk`: a disk of `radius`, then cv2's 3x3 Gaussian blur.

    Cropped to its support (the disk's, plus one pixel of blur), so the
    kernel of a CIFAR severity is at most 5x5 and fits 8x8 images.
    """
    half = int(np.floor(radius)) + 1
    grid = np.arange(-half, half + 1)
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius ** 2)
    disk = disk / disk.sum()
    taps = _gaussian_taps(alias_blur, 1)  # cv2.getGaussianKernel(3, sigma)
    padded = np.pad(disk, 1)
    return sum(taps[i] * taps[j] * padded[i:i + disk.shape[0],
                                          j:j + disk.shape[1]]
               for i in range(3) for j in range(3))


@_corruption(radius_and_alias_blur=(
    (0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)))
def defocus_blur(x, radius_and_alias_blur, seed):
    """Blur by an anti-aliased disk kernel (an out-of-focus lens)."""
    return _filter(x, _disk_kernel(*radius_and_alias_blur), "reflect")


@_corruption(sigma=(0.4, 0.6, 0.7, 0.8, 1.0))
def gaussian_blur(x, sigma, seed):
    """Gaussian blur of standard deviation `sigma` pixels.

    `skimage.filters.gaussian`'s kernel: truncated at 4 sigma.
    """
    taps = _gaussian_taps(sigma, int(4.0 * sigma + 0.5))
    return _filter(x, np.outer(taps, taps), "nearest")


# Digital and weather.

@_corruption(factor=(0.75, 0.5, 0.4, 0.3, 0.15))
def contrast(x, factor, seed):
    """Moves every value towards its image's channel mean by `factor`."""
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    return (x - mean) * factor + mean


@_corruption(shift=(0.05, 0.1, 0.15, 0.2, 0.3))
def brightness(x, shift, seed):
    """Adds `shift` to the HSV value (max channel), clipped to 1.

    RGB goes through `tf.image.rgb_to_hsv` as in Hendrycks' code (skimage);
    a gray value is its own HSV value, so gray images get `x + shift`.
    """
    if x.shape[-1] == 1:
        return x + shift
    hue, saturation, value = tf.unstack(tf.image.rgb_to_hsv(x), axis=-1)
    value = tf.minimum(value + shift, 1.0)
    return tf.image.hsv_to_rgb(tf.stack([hue, saturation, value], axis=-1))


@_corruption(quality=(80, 65, 58, 50, 40))
def jpeg_compression(x, quality, seed):
    """Encodes every image as a JPEG of `quality` and decodes it again."""
    # adjust_jpeg_quality takes one image (1 or 3 channels) at a time.
    return tf.map_fn(
        lambda image: tf.image.adjust_jpeg_quality(image, quality), x,
        fn_output_signature=tf.float32)


def _box_resize_matrix(in_size, out_size):
    """`[out_size, in_size]` weights of PIL's `Image.resize(size, BOX)`.

    An output pixel is the mean of the input pixels whose centres fall in
    its footprint (at least one pixel wide, so upsampling is nearest
    neighbour); not TF's "area" resize, which weights partial overlaps.
    The float64 steps are PIL's own (`precompute_coeffs` in Resample.c), so
    ties at footprint edges fall the same way.
    """
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    filter_scale = tf.maximum(scale, 1.0)
    support = 0.5 * filter_scale
    centre = (tf.cast(tf.range(out_size), tf.float64)[:, None] + 0.5) * scale
    first = tf.floor(centre - support + 0.5)
    stop = tf.floor(centre + support + 0.5)
    pixel = tf.cast(tf.range(in_size), tf.float64)[None, :]
    x = (pixel - centre + 0.5) * (1.0 / filter_scale)
    inside = (pixel >= first) & (pixel < stop) & (x > -0.5) & (x <= 0.5)
    weights = tf.cast(inside, tf.float64)
    return tf.cast(weights / tf.reduce_sum(weights, axis=1, keepdims=True),
                   tf.float32)


@_corruption(scale=(0.95, 0.9, 0.85, 0.75, 0.65))
def pixelate(x, scale, seed):
    """Box-downsamples to `int(size * scale)` pixels and back up (PIL BOX)."""
    height, width = tf.shape(x)[1], tf.shape(x)[2]

    def there_and_back(size):
        # float64, as Python computes int(32 * 0.95) = 30.
        small = tf.maximum(
            tf.cast(tf.cast(size, tf.float64) * scale, tf.int32), 1)
        return tf.matmul(_box_resize_matrix(small, size),
                         _box_resize_matrix(size, small))

    return tf.einsum("ih,jw,bhwc->bijc", there_and_back(height),
                     there_and_back(width), x)


CORRUPTIONS = {fn.__name__: fn for fn in (
    gaussian_noise, shot_noise, impulse_noise, speckle_noise, defocus_blur,
    gaussian_blur, contrast, brightness, jpeg_compression, pixelate)}
"""Name -> `fn(images, severity, seed=0)`; the names are TFDS's too, and
`fn.parameters` holds the five severities' parameters."""


def corrupt(images, name, severity, seed=0):
    """Applies corruption `name` at `severity` to a batch of images.

    Args:
      images: float tensor or array `[batch, height, width, 1 or 3]` in
        [0, 1]; batch, height and width may be dynamic.
      name: str. One of `CORRUPTIONS`.
      severity: int. 1 (mild) to 5 (strong).
      seed: int or pair of ints (or an int tensor of shape [2]). The noise
        of stateless random ops: the same seed and shape give the same
        output.

    Returns:
      The corrupted batch, same shape and dtype, values in [0, 1].

    Example:
    >>> x = tf.fill([2, 8, 8, 1], 0.5)
    >>> corrupt(x, "contrast", 5).shape
    TensorShape([2, 8, 8, 1])
    """
    if name not in CORRUPTIONS:
        raise ValueError(
            f"Unknown corruption {name!r}: choose one of "
            f"{tuple(CORRUPTIONS)}.")
    return CORRUPTIONS[name](images, severity, seed)


def load_cifar10_corrupted(corruption, severity, batch_size, data_dir=None,
                           image_size=None):
    """The CIFAR-10-C test set of one corruption and severity, from TFDS.

    Reads `cifar10_corrupted/<corruption>_<severity>`, which must have been
    prepared in `data_dir` (`tfds build`): nothing is downloaded here.

    Args:
      corruption: str. One of `TFDS_CORRUPTIONS`; `"glass_blur"` and
        `"elastic_transform"` (the paper's names) are accepted too.
      severity: int. 1 to 5.
      batch_size: int. Examples per batch; the last batch may be smaller.
      data_dir: str or None. TFDS data folder; None is TFDS's default.
      image_size: int or None. Resize to this height and width; None keeps
        32.

    Returns:
      `(dataset, num_examples)`: one ordered pass of `(images float32
      [batch, size, size, 3] in [0, 1], labels int32 [batch])` batches, and
      the number of examples (10,000 for the real data; None if unknown).

    Raises:
      FileNotFoundError: the config is not prepared in `data_dir`.
    """
    from topk_sparse.data import images

    tfds_name = TFDS_ALIASES.get(corruption, corruption)
    if tfds_name not in TFDS_CORRUPTIONS:
        raise ValueError(
            f"Unknown CIFAR-10-C corruption {corruption!r}: choose one of "
            f"{TFDS_CORRUPTIONS} (or {tuple(TFDS_ALIASES)}).")
    severity = check_severity(severity)
    batch_size = checks.positive_int(batch_size, "batch_size")
    builder = images.prepared_builder(
        f"cifar10_corrupted/{tfds_name}_{severity}", data_dir)
    ds = builder.as_dataset(split="test", shuffle_files=False)
    num_examples = int(ds.cardinality())
    preprocess = images.cifar_preprocess(image_size, False, 0)
    ds = ds.map(lambda ex: (preprocess(ex["image"]),
                            tf.cast(ex["label"], tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return ds, num_examples if num_examples >= 0 else None
