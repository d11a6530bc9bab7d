"""Input pipelines: embedded default data and TFDS datasets.

`load(data_config, split, batch_size, train=...)` reads `config.data` of a
training config and returns `(dataset, num_examples)`:

- images (`topk_sparse.data.images`): `"digits"` (ships with scikit-learn),
  `"cifar10"`, `"imagenet2012"` (TFDS, prepared beforehand, never
  downloaded here); batches of `(images, labels)`.
- text (`topk_sparse.data.text`): `"synthetic"` (generated in process),
  `"c4"` (TFDS span corruption over byte tokens), `"wmt"` (a TFDS
  translation pair over byte tokens, `wmt14_translate/de-en` by default);
  batches of `(inputs, targets, weights)` for T5.
"""

from topk_sparse.data import images, text

DATASETS = (*images.DATASETS, "synthetic", "c4", "wmt")


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
    kwargs = dict(data_config)
    name = kwargs.pop("name")
    if name == "synthetic":
        return text.load_synthetic(split, batch_size, train=train, seed=seed,
                                   **kwargs)
    if name == "c4":
        return text.load_c4(split, batch_size, train=train, seed=seed,
                            **kwargs)
    if name == "wmt":
        return text.load_translation(split, batch_size, train=train,
                                     seed=seed, **kwargs)
    if name in images.DATASETS:
        return images.load(name, split, batch_size, train=train, seed=seed,
                           **kwargs)
    raise ValueError(f"Unknown dataset {name!r}: choose one of {DATASETS}.")


def vocab_size(data_config):
    """Token ids the model must embed for a text `config.data`."""
    if data_config.name in ("c4", "wmt"):
        return text.BYTE_VOCAB_SIZE
    return data_config.vocab_size
