"""WMT translation pairs for T5 (TFDS, mocked offline) and configs/t5_wmt.py.

`tfds.testing.mock_data` makes up every record (random strings of
" abcdefghij", 10-19 characters, per language), so nothing is downloaded.
"""

import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests.mock_tfds import mocked_tfds
from tests.runs import CONFIGS, load_config
from topk_sparse import data, training
from topk_sparse.data import text

DATASET = "wmt14_translate/de-en"


@pytest.fixture
def wmt_data_dir(tmp_path):
    with mocked_tfds(tmp_path / "tfds", [DATASET]) as data_dir:
        yield data_dir


def _raw_pairs(data_dir, split):
    builder = tfds.builder(DATASET, data_dir=data_dir)
    return list(builder.as_dataset(split=split).as_numpy_iterator())


def _bytes(ids):
    """The bytes of token ids before EOS."""
    ids = list(ids)
    return bytes(t - text.BYTE_OFFSET for t in ids[:ids.index(text.EOS_ID)])


@pytest.mark.parametrize("source,target,task_prefix,prefix", [
    ("en", "de", True, b"translate English to German: "),
    ("de", "en", False, b""),
], ids=["en-de-prefixed", "de-en-bare"])
def test_eval_pairs_are_prefixed_truncated_and_shifted(
        wmt_data_dir, source, target, task_prefix, prefix):
    config = {"name": "wmt", "dataset": DATASET, "data_dir": wmt_data_dir,
              "source_language": source, "target_language": target,
              "task_prefix": task_prefix, "source_length": 40,
              "target_length": 16}
    ds, num_examples = data.load(config, "test", 4, train=False)
    assert num_examples == 6
    inputs_spec, targets_spec, weights_spec = ds.element_spec
    assert inputs_spec["encoder_tokens"].shape[1:] == (40,)
    assert inputs_spec["decoder_tokens"].shape[1:] == (16,)
    assert targets_spec.shape[1:] == weights_spec.shape[1:] == (16,)
    assert inputs_spec["encoder_tokens"].dtype == tf.int32
    batches = list(ds.as_numpy_iterator())
    assert [len(t) for _, t, _ in batches] == [4, 2]  # nothing dropped

    # "test" reads TFDS's validation split (newstest2013), in order.
    pairs = _raw_pairs(wmt_data_dir, "validation")
    encoder = np.concatenate([x["encoder_tokens"] for x, _, _ in batches])
    decoder = np.concatenate([x["decoder_tokens"] for x, _, _ in batches])
    targets = np.concatenate([t for _, t, _ in batches])
    weights = np.concatenate([w for _, _, w in batches])
    truncated = 0
    for pair, e, d, t, w in zip(pairs, encoder, decoder, targets, weights):
        # Truncated to the static lengths with EOS, as T5 does.
        assert _bytes(e) == (prefix + pair[source])[:39]
        assert _bytes(t) == pair[target][:15]
        truncated += len(pair[target]) > 15
        assert d[0] == text.DECODER_START_ID
        np.testing.assert_array_equal(d[1:], t[:-1])
        np.testing.assert_array_equal(w, t != text.PAD_ID)
        assert w.sum() == min(len(pair[target]), 15) + 1  # EOS counts
    assert 0 < truncated < 6  # both cases were checked


def test_train_stream_is_static_shuffled_seeded_and_repeated(wmt_data_dir):
    def first_sources(seed, batches=1):
        ds, num_examples = text.load_translation(
            "train", 4, train=True, data_dir=wmt_data_dir, source_length=64,
            target_length=32, shuffle_buffer=8, seed=seed)
        assert num_examples == 6
        return [x["encoder_tokens"] for x, _, _ in ds.take(batches)]

    ds, _ = text.load_translation("train", 4, train=True,
                                  data_dir=wmt_data_dir)
    assert ds.element_spec[0]["encoder_tokens"].shape == (4, 256)
    assert ds.element_spec[1].shape == (4, 256)
    # 3 batches of 4 from 6 pairs: the stream repeats and never ends short.
    sources = np.concatenate(first_sources(seed=1, batches=3))
    prefix = b"translate English to German: "
    english = {prefix + pair["en"]
               for pair in _raw_pairs(wmt_data_dir, "train")}
    assert {_bytes(s) for s in sources} == english
    np.testing.assert_array_equal(first_sources(1)[0], first_sources(1)[0])
    assert not np.array_equal(first_sources(1)[0], first_sources(2)[0])


def test_eval_split_and_num_eval_examples(wmt_data_dir):
    ds, num_examples = text.load_translation(
        "test", 4, train=False, data_dir=wmt_data_dir, eval_split="test",
        num_eval_examples=5)
    assert num_examples == 5
    assert [int(t.shape[0]) for _, t, _ in ds] == [4, 1]


def test_bad_arguments_raise_before_reading_anything(tmp_path):
    def load(**kwargs):
        return text.load_translation("train", 4, train=True,
                                     data_dir=str(tmp_path), **kwargs)

    with pytest.raises(ValueError, match=r"source_language='fr' is not a "
                       r"language of TFDS dataset 'wmt14_translate/de-en': "
                       r"choose from \['de', 'en'\]"):
        load(source_language="fr")
    with pytest.raises(ValueError, match="target_language='ro'"):
        load(target_language="ro")
    with pytest.raises(ValueError, match="both 'en'"):
        load(target_language="en")
    with pytest.raises(ValueError, match="'c4' is not a translation dataset"
                                         ".*'text'"):
        load(dataset="c4")
    with pytest.raises(ValueError, match="source_length=30 leaves no room.*"
                                         "take 30 tokens"):
        load(source_length=30)
    with pytest.raises(ValueError, match="target_length must be at least 2"):
        load(target_length=1)
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        text.load_translation("validation", 4, train=False)
    assert not list(tmp_path.iterdir())


def test_unprepared_dataset_names_it_and_the_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.load({"name": "wmt", "dataset": DATASET,
                   "data_dir": str(tmp_path)}, "train", 8, train=True)
    message = str(error.value)
    assert f"'{DATASET}'" in message and str(tmp_path) in message
    assert f"tfds build {DATASET}" in message
    assert not list(tmp_path.iterdir()), "nothing may be downloaded"


# configs/t5_wmt.py (as test_training.test_configs_build_and_document_
# themselves does for the other configs).

def test_config_builds_and_documents_itself():
    config, local = load_config("t5_wmt"), load_config("t5_wmt", "runlocal")
    for key in ("model", "optimizer", "data", "eval"):
        assert key in config
    assert local.epochs * local.steps_per_epoch <= 10
    assert config.data.name == "wmt" and config.data.dataset == DATASET
    assert data.features(config.data) == {"vocab_size": text.BYTE_VOCAB_SIZE}
    spec = importlib.util.spec_from_file_location(
        "t5_wmt", os.path.join(CONFIGS, "t5_wmt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "python -m trainers.t5 --config=configs/t5_wmt.py" \
        in module.__doc__
    assert f"tfds build {DATASET}" in module.__doc__
    assert "Expected" in module.__doc__


def test_train_t5_wmt_runlocal_on_mocked_tfds(tmp_path):
    data_dir = str(tmp_path / "tfds")
    config = load_config("t5_wmt", "runlocal")
    config.jit_compile = False  # XLA compiles slowly on a shared CPU
    config.data.data_dir = data_dir
    with mocked_tfds(data_dir, [DATASET], num_examples=16):
        report = training.train(config, str(tmp_path / "run"))
    assert report["dataset"] == "wmt"
    assert report["train_steps"] == 2 * 2
    assert np.isfinite(report["eval"]["loss"])
    assert 0.0 <= report["eval"]["token_accuracy"] <= 1.0
    assert 0.0 <= report["eval"]["exact_match"] <= 1.0
    for value in report["nonzero_fraction"].values():
        assert 0.0 < value <= 32 / 256  # Top-32 of the tiny mlp_dim 256
