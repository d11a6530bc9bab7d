"""Random images: uniform-noise pixels with uniform random labels.

The "random images" of *The Lazy Neuron Phenomenon* (arXiv 2210.06313,
claim 3: sparsity emerges even with random inputs): nothing to learn but
the labels of the training images by heart. Batches of `(images, labels)`
as the image pipelines give them (`topk_sparse.data.images`).
"""

import numpy as np
import tensorflow as tf

from topk_sparse import registry

RANDOM_IMAGES = "random_images"
"""Its dataset name (`config.data.name`)."""


def load_random_images(split, batch_size, *, train, seed=0, image_size=16,
                       channels=1, num_classes=10, num_examples=1437):
    """A fixed set of uniform-noise images with uniform random labels.

    `num_examples` training images; the test split has a quarter as many,
    drawn from another stream.

    Returns:
      `(dataset, num_examples)` as the image pipelines do
      (`topk_sparse.data.images.load`).
    """
    rng = np.random.default_rng([seed, int(split == "test")])
    n = num_examples if split == "train" else max(num_examples // 4, 1)
    x = rng.uniform(size=(n, image_size, image_size, channels))
    y = rng.integers(0, num_classes, n)
    ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"),
                                             y.astype("int32")))
    if train:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.prefetch(tf.data.AUTOTUNE), n


registry.register_dataset(
    RANDOM_IMAGES, load_random_images,
    features=lambda kwargs: {"num_classes": kwargs.get("num_classes", 10)})
