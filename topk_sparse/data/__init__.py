"""Input pipelines by name: embedded default data and TFDS datasets.

`load(data_config, split, batch_size, train=...)` reads `config.data` of a
training config and returns `(dataset, num_examples)`. Each pipeline
registers itself (`topk_sparse.registry.register_dataset`) where it is
defined:

- images (`topk_sparse.data.images`): `"digits"` (ships with scikit-learn),
  `"cifar10"`, `"imagenet2012"` (TFDS, prepared beforehand, never
  downloaded here); batches of `(images, labels)`.
- random images (`topk_sparse.data.random_images`): `"random_images"`,
  uniform noise with random labels (the study's claim 3).
- text (`topk_sparse.data.text`): `"synthetic"` (generated in process),
  `"c4"` (TFDS span corruption over byte tokens), `"wmt"` (a TFDS
  translation pair over byte tokens, `wmt14_translate/de-en` by default);
  batches of `(inputs, targets, weights)` for T5.
"""

import keras
import numpy as np

from topk_sparse import registry
from topk_sparse.data import (  # noqa: F401 (they register)
    images, random_images, text)


def _entry(data_config):
    kwargs = dict(data_config)
    name = kwargs.pop("name")
    return registry.lookup(registry.DATASETS, name, "dataset"), kwargs


def load(data_config, split, batch_size, *, train, seed=0):
    """Dispatches `config.data` to its pipeline; see the modules' `load*`.

    Args:
      data_config: `config.data`, a ConfigDict (or dict) with `name` and the
        keyword arguments of that dataset's loader.
      split: str. `"train"` or `"test"`.
      batch_size: int. Global batch size.
      train: bool. A shuffled, repeated training stream with static batch
        shapes, or one ordered pass for evaluation.
      seed: int. Seed of shuffling, augmentation, label noise and synthetic
        examples.
    """
    entry, kwargs = _entry(data_config)
    return entry.load(split, batch_size, train=train, seed=seed, **kwargs)


def features(data_config):
    """What a model must know of `config.data`'s dataset: `num_classes`
    (images) or `vocab_size` (text)."""
    entry, kwargs = _entry(data_config)
    return entry.features(kwargs)


def numpy_inputs(inputs):
    """Model inputs (a tensor or a dict of them) as numpy arrays, which a
    model of either backend takes."""
    return keras.tree.map_structure(np.asarray, inputs)


def first_inputs(dataset, number):
    """The model inputs of `dataset`'s first `number` examples (batches of
    `(inputs, labels[, weights])`), as one batch of numpy arrays in a list
    (a list of batches is what calibration and allocation take)."""
    batch = next(iter(dataset.unbatch().batch(number).take(1)))
    return [numpy_inputs(batch[0])]
