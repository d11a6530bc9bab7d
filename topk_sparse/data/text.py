"""Sequence-to-sequence input pipelines for T5: `(inputs, targets, weights)`.

`inputs` is `{"encoder_tokens": int32 [batch, L_in], "decoder_tokens": int32
[batch, L_out]}`, `targets` int32 `[batch, L_out]`, `weights` float32
`[batch, L_out]` (1 on real target tokens, 0 on padding), every shape static.
Token ids follow T5: 0 is padding and also the decoder's start token, 1 ends
a sequence; `decoder_tokens` are the targets shifted right by one.

- `"synthetic"`: a task generated in process, infinite and seeded: a random
  sequence of content tokens (ids 2 and up) of random length, and as target
  the same tokens `"sorted"`, `"reversed"` or `"copied"`. The default with no
  network; `"sorted"` needs only bag-of-tokens attention and learns fastest.
- `"c4"`: T5's span-corruption pretraining objective (Raffel et al., arXiv
  1910.10683, Sec. 3.1.4) on TFDS `c4/en`, prepared beforehand. Tokens are
  UTF-8 bytes, as in ByT5 (arXiv 2105.13626): id = byte + 3, then 100
  sentinels at the top of the vocabulary (`<extra_id_0>` is the last id),
  `BYTE_VOCAB_SIZE` ids in all. Bytes need no vocabulary file, so the
  pipeline runs offline; the paper's T5 used a 32k SentencePiece vocabulary,
  so its numbers are not directly comparable.
- `"wmt"`: sentence pairs of a TFDS translation dataset (default
  `wmt14_translate/de-en`, English to German), prepared beforehand, over the
  same byte tokens; the source gets T5's task prefix
  (`"translate English to German: "`) and both sides are truncated to
  static lengths, as in T5.

TFDS datasets are never downloaded here: one that is not prepared raises an
error naming it and the data_dir searched (`images.prepared_builder`).
"""

import tensorflow as tf

from topk_sparse import registry
from topk_sparse.data.images import prepared_builder
from topk_sparse.vocabulary import DECODER_START_ID, EOS_ID, PAD_ID

FIRST_CONTENT_ID = EOS_ID + 1  # synthetic tasks: every id after pad and EOS

SYNTHETIC_TASKS = ("sort", "reverse", "copy")
SYNTHETIC_VOCAB_SIZE = 32

# Bytes: ids 3..258, as in ByT5 (0 pad, 1 EOS, 2 unknown), then sentinels.
BYTE_OFFSET = 3
NUM_SENTINELS = 100
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256 + NUM_SENTINELS


def load_synthetic(split, batch_size, *, train, task="sort",
                   vocab_size=SYNTHETIC_VOCAB_SIZE,
                   min_length=4, max_length=12, num_eval_examples=512,
                   seed=0):
    """The synthetic seq2seq task as a batched `tf.data.Dataset`.

    Args:
      split: str. `"train"` or `"test"`; they draw from different streams.
      batch_size: int. Global batch size.
      train: bool. Infinite and `drop_remainder=True` (True), or the first
        `num_eval_examples` of the split once (False).
      task: str. One of `SYNTHETIC_TASKS`.
      vocab_size: int. Vocabulary size, special ids included (> 2).
      min_length: int. Shortest source sequence, EOS excluded.
      max_length: int. Longest source sequence, EOS excluded; every sequence
        is padded to `max_length + 1`.
      num_eval_examples: int. Size of a finite (`train=False`) split.
      seed: int. Seed of the examples; the same seed gives the same data.

    Returns:
      `(dataset, num_examples)`; `num_examples` is None for `train=True`.
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(
            f"Unknown synthetic task {task!r}: choose one of "
            f"{SYNTHETIC_TASKS}.")
    if split not in ("train", "test"):
        raise ValueError(
            f"The synthetic task has splits 'train' and 'test', got "
            f"{split!r}.")
    if vocab_size <= FIRST_CONTENT_ID:
        raise ValueError(
            f"vocab_size must exceed {FIRST_CONTENT_ID} (padding and EOS), "
            f"got {vocab_size}.")
    if not 1 <= min_length <= max_length:
        raise ValueError(
            f"Need 1 <= min_length <= max_length, got {min_length} and "
            f"{max_length}.")
    stream = 2 * seed + (split == "test")
    example = _synthetic_example_fn(task, vocab_size, min_length, max_length,
                                    stream)
    if train:
        ds = tf.data.Dataset.counter().map(
            example, num_parallel_calls=tf.data.AUTOTUNE)
        num_examples = None
    else:
        ds = tf.data.Dataset.range(num_eval_examples).map(example)
        num_examples = num_eval_examples
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.prefetch(tf.data.AUTOTUNE), num_examples


def _synthetic_example_fn(task, vocab_size, min_length, max_length, stream):
    total = max_length + 1  # room for EOS

    def example(index):
        key = tf.stack([tf.constant(stream, tf.int64), index])
        length = tf.random.stateless_uniform(
            [], key, min_length, max_length + 1, dtype=tf.int32)
        tokens = tf.random.stateless_uniform(
            [max_length], key + [0, 2**40], FIRST_CONTENT_ID, vocab_size,
            dtype=tf.int32)
        tokens = tokens[:length]
        if task == "sort":
            target = tf.sort(tokens)
        elif task == "reverse":
            target = tf.reverse(tokens, [0])
        else:
            target = tokens
        return seq2seq_example(tokens, target, total, total)

    return example


def seq2seq_example(source, target, source_length, target_length):
    """Appends EOS, pads to static lengths and shifts the decoder inputs.

    `source` and `target` are 1-D int32 token ids without EOS, no longer
    than `source_length - 1` and `target_length - 1`.
    """
    def finish(tokens, length):
        tokens = tf.concat([tokens, [EOS_ID]], axis=0)
        tokens = tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]],
                        constant_values=PAD_ID)
        return tf.ensure_shape(tokens, [length])

    encoder_tokens = finish(source, source_length)
    targets = finish(target, target_length)
    decoder_tokens = tf.concat([[DECODER_START_ID], targets[:-1]], axis=0)
    weights = tf.cast(targets != PAD_ID, tf.float32)
    inputs = {"encoder_tokens": encoder_tokens,
              "decoder_tokens": decoder_tokens}
    return inputs, targets, weights


def load_c4(split, batch_size, *, train, data_dir=None, input_length=512,
            noise_density=0.15, mean_noise_span_length=20.0,
            num_eval_examples=1024, shuffle_buffer=10_000, seed=0):
    """C4 span corruption over byte tokens as a batched `tf.data.Dataset`.

    Documents are turned into bytes, concatenated and cut into chunks of
    `input_length` tokens; in each chunk a share `noise_density` of the
    tokens, in spans of mean length `mean_noise_span_length`, is replaced
    in the encoder input by one sentinel per span, and the targets are the
    sentinels each followed by its span. Every chunk has the same number of
    noise tokens and spans, so all shapes are static.

    Args:
      split: str. `"train"` or `"test"` (C4's validation split).
      batch_size: int. Global batch size.
      train: bool. Shuffled and infinite (True) or the first
        `num_eval_examples` chunks once (False).
      data_dir: str or None. TFDS data folder with `c4/en` prepared.
      input_length: int. Tokens per chunk before corruption.
      noise_density: float in (0, 1). Share of tokens corrupted.
      mean_noise_span_length: float. Mean span length; ByT5 uses 20 bytes
        (T5's 3 SentencePiece tokens are about that many bytes).
      num_eval_examples: int. Chunks in a `train=False` split.
      shuffle_buffer: int. Shuffle buffer of documents when training.
      seed: int. Seed of the shuffle and of the noise spans.

    Returns:
      `(dataset, num_examples)`; `num_examples` is None when training.
    """
    num_noise, num_spans = _noise_counts(input_length, noise_density,
                                         mean_noise_span_length)
    builder = prepared_builder("c4", data_dir)
    ds = builder.as_dataset(
        split="train" if split == "train" else "validation",
        shuffle_files=train, read_config=_read_config(seed))
    if train:
        ds = ds.repeat().shuffle(shuffle_buffer, seed=seed)
    ds = ds.map(lambda ex: _bytes_to_ids(ex["text"]),
                num_parallel_calls=tf.data.AUTOTUNE)
    # Pack: one stream of tokens cut into equal chunks, as T5 does.
    ds = ds.unbatch().batch(input_length, drop_remainder=True)
    ds = ds.enumerate().map(
        lambda index, tokens: _span_corruption(
            tokens, num_noise, num_spans, tf.stack([
                tf.constant(2 * seed + (split != "train"), tf.int64),
                index])),
        num_parallel_calls=tf.data.AUTOTUNE)
    num_examples = None
    if not train:
        ds = ds.take(num_eval_examples)
        num_examples = num_eval_examples  # at most: C4 validation is larger
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.prefetch(tf.data.AUTOTUNE), num_examples


def _read_config(seed):
    import tensorflow_datasets as tfds

    return tfds.ReadConfig(shuffle_seed=seed)


def _bytes_to_ids(text):
    return tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32) + BYTE_OFFSET


def _noise_counts(length, noise_density, mean_noise_span_length):
    """T5's counts: noise tokens (at least 1, at most length - 1) and spans."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(
            f"noise_density must be in (0, 1), got {noise_density}.")
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    if num_spans > NUM_SENTINELS:
        raise ValueError(
            f"{num_spans} noise spans per chunk need more than the "
            f"{NUM_SENTINELS} sentinels: shorten input_length or lengthen "
            f"mean_noise_span_length.")
    return num_noise, num_spans


def random_spans_noise_mask(length, num_noise, num_spans, seed):
    """Bool `[length]`: `num_noise` True in `num_spans` spans, at random.

    T5's `random_spans_noise_mask`: noise and non-noise lengths are each a
    random partition into `num_spans` nonempty parts, interleaved starting
    with non-noise, so the chunk never starts with noise.
    """
    def random_partition(num_items, part_seed):
        starts = tf.cast(tf.range(num_items - 1) < num_spans - 1, tf.int32)
        starts = tf.random.experimental.stateless_shuffle(starts, part_seed)
        segment = tf.cumsum(tf.pad(starts, [[1, 0]]))
        return tf.math.segment_sum(tf.ones_like(segment), segment)

    seeds = tf.random.experimental.stateless_split(seed, 2)
    noise = random_partition(num_noise, seeds[0])
    nonnoise = random_partition(length - num_noise, seeds[1])
    interleaved = tf.reshape(tf.stack([nonnoise, noise], axis=1),
                             [2 * num_spans])
    span_starts = tf.cumsum(interleaved)[:-1]
    start_indicator = tf.math.unsorted_segment_sum(
        tf.ones_like(span_starts), span_starts, length)
    return tf.cumsum(start_indicator) % 2 == 1


def _span_corruption(tokens, num_noise, num_spans, seed):
    length = tokens.shape[0]
    noise = random_spans_noise_mask(length, num_noise, num_spans, seed)
    inputs = _replace_spans_with_sentinels(tokens, noise)
    targets = _replace_spans_with_sentinels(tokens, ~noise)
    # EOS appended to each: the static lengths the model sees.
    return seq2seq_example(inputs, targets,
                           length - num_noise + num_spans + 1,
                           num_noise + num_spans + 1)


def _replace_spans_with_sentinels(tokens, mask):
    """Each run of masked tokens becomes one sentinel: the i-th run
    `<extra_id_i>` = `BYTE_VOCAB_SIZE - 1 - i`."""
    previous = tf.pad(mask[:-1], [[1, 0]])
    first = mask & ~previous
    sentinel = BYTE_VOCAB_SIZE - tf.cumsum(tf.cast(first, tf.int32))
    tokens = tf.where(first, sentinel, tokens)
    return tf.boolean_mask(tokens, ~(mask & previous))


# Language names of T5's task prefixes (Raffel et al., arXiv 1910.10683,
# Appendix D: "translate English to German: ..."), for the WMT languages.
LANGUAGE_NAMES = {
    "cs": "Czech", "de": "German", "en": "English", "et": "Estonian",
    "fi": "Finnish", "fr": "French", "gu": "Gujarati", "hi": "Hindi",
    "ja": "Japanese", "kk": "Kazakh", "lt": "Lithuanian", "lv": "Latvian",
    "ro": "Romanian", "ru": "Russian", "tr": "Turkish", "zh": "Chinese",
}


def load_translation(split, batch_size, *, train,
                     dataset="wmt14_translate/de-en", source_language="en",
                     target_language="de", data_dir=None, source_length=256,
                     target_length=256, task_prefix=True,
                     eval_split="validation", num_eval_examples=None,
                     shuffle_buffer=10_000, seed=0):
    """Sentence pairs of a TFDS translation dataset over byte tokens.

    Both sides are UTF-8 bytes with the ids of C4 above. The source starts
    with T5's task prefix (`"translate English to German: "`) unless
    `task_prefix` is False. A sentence too long for its static length is
    truncated, keeping its start and the EOS, as T5 does; nothing is
    filtered out, so evaluation sees every pair.

    Args:
      split: str. `"train"` or `"test"` (the TFDS split `eval_split`).
      batch_size: int. Global batch size.
      train: bool. Shuffled, repeated and `drop_remainder=True` (True), or
        one ordered pass over the split, the last batch partial (False).
      dataset: str. A TFDS dataset with a `Translation` feature, e.g.
        `"wmt14_translate/de-en"` or `"wmt_t2t_translate/de-en"` (T5's).
      source_language: str. Language code of the encoder side.
      target_language: str. Language code of the decoder side.
      data_dir: str or None. TFDS data folder with `dataset` prepared.
      source_length: int. Encoder tokens: task prefix, bytes and EOS.
      target_length: int. Decoder tokens: bytes and EOS.
      task_prefix: bool. Prefix the source with `"translate <source> to
        <target>: "` (names from `LANGUAGE_NAMES`, else the codes).
      eval_split: str. TFDS split read for `"test"`: for WMT `"validation"`
        (newstest2013 for wmt14 de-en, T5's validation set) or `"test"`
        (newstest2014).
      num_eval_examples: int or None. Pairs read for `train=False`; None
        reads the whole split.
      shuffle_buffer: int. Shuffle buffer of sentence pairs when training.
      seed: int. Seed of the file order and of the shuffle.

    Returns:
      `(dataset, num_examples)`: the batched dataset and the pairs in one
      pass over the split (after `num_eval_examples`), None if unknown.
    """
    import tensorflow_datasets as tfds

    if split not in ("train", "test"):
        raise ValueError(
            f"Translation has splits 'train' and 'test', got {split!r}.")
    features = tfds.builder(dataset, data_dir=data_dir).info.features
    if not isinstance(features, tfds.features.Translation):
        raise ValueError(
            f"TFDS dataset {dataset!r} is not a translation dataset: its "
            f"features are {sorted(features.keys())}.")
    for name, language in (("source_language", source_language),
                           ("target_language", target_language)):
        if language not in features.languages:
            raise ValueError(
                f"{name}={language!r} is not a language of TFDS dataset "
                f"{dataset!r}: choose from {sorted(features.languages)}.")
    if source_language == target_language:
        raise ValueError(
            f"source_language and target_language are both "
            f"{source_language!r}.")
    prefix = ""
    if task_prefix:
        prefix = "translate {} to {}: ".format(*(
            LANGUAGE_NAMES.get(code, code)
            for code in (source_language, target_language)))
    # At least one source byte after the prefix, and one target byte.
    prefix_length = len(prefix.encode())
    if source_length < prefix_length + 2:
        raise ValueError(
            f"source_length={source_length} leaves no room for the source: "
            f"the task prefix {prefix!r} and EOS take "
            f"{prefix_length + 1} tokens.")
    if target_length < 2:
        raise ValueError(f"target_length must be at least 2 (a byte and "
                         f"EOS), got {target_length}.")

    builder = prepared_builder(dataset, data_dir)
    ds = builder.as_dataset(split="train" if split == "train" else eval_split,
                            shuffle_files=train,
                            read_config=_read_config(seed))
    if not train and num_eval_examples is not None:
        ds = ds.take(num_eval_examples)
    num_examples = int(ds.cardinality())
    if train:
        ds = ds.shuffle(shuffle_buffer, seed=seed,
                        reshuffle_each_iteration=True).repeat()

    def example(pair):
        source = _bytes_to_ids(prefix + pair[source_language])
        target = _bytes_to_ids(pair[target_language])
        return seq2seq_example(source[:source_length - 1],
                               target[:target_length - 1],
                               source_length, target_length)

    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=train)
    return ds.prefetch(tf.data.AUTOTUNE), (
        num_examples if num_examples >= 0 else None)


registry.register_dataset(
    "synthetic", load_synthetic, features=lambda kwargs: {
        "vocab_size": kwargs.get("vocab_size", SYNTHETIC_VOCAB_SIZE)})
for _name, _load in (("c4", load_c4), ("wmt", load_translation)):
    registry.register_dataset(
        _name, _load, features=lambda kwargs: {"vocab_size": BYTE_VOCAB_SIZE})
