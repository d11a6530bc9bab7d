"""The trainer knows models, datasets and evaluators only by registration.

A model and a dataset defined here, in the test file, train through
`training.train` like ViT and T5 do.
"""

import inspect
import json
import os
import re

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from topk_sparse.configs import common
from topk_sparse import registry, training
from topk_sparse.layers import SparseMLP

FEATURES, CLASSES = 6, 3


def blobs(split, batch_size, *, train, seed=0, size=96):
    """Three Gaussian blobs: `(features [batch, 4, FEATURES], labels)`."""
    rng = np.random.default_rng(seed + (split == "test"))
    labels = rng.integers(0, CLASSES, size)
    centers = np.eye(CLASSES, FEATURES) * 3
    x = (centers[labels][:, None] + rng.normal(size=(size, 4, FEATURES)))
    ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"),
                                             labels.astype("int32")))
    if train:
        ds = ds.shuffle(size, seed=seed).repeat()
    return ds.batch(batch_size, drop_remainder=train), size


@keras.saving.register_keras_serializable(package="test_registry")
class TokenClassifier(keras.Model):
    """One Top-k MLP over tokens, mean-pooled, then a linear head."""

    def __init__(self, num_classes, mlp_dim=32, k=4, **kwargs):
        inputs = keras.Input((4, FEATURES))
        self.mlp = SparseMLP(mlp_dim, k=k, name="token_mlp")
        pooled = keras.ops.mean(self.mlp(inputs), axis=1)
        outputs = keras.layers.Dense(num_classes)(pooled)
        super().__init__(inputs, outputs, **kwargs)
        self.num_classes, self.mlp_dim, self.k = num_classes, mlp_dim, k

    def sparse_mlps(self):
        return {self.mlp.name: self.mlp}

    def get_config(self):
        return {"num_classes": self.num_classes, "mlp_dim": self.mlp_dim,
                "k": self.k, "name": self.name}


@pytest.fixture(autouse=True)
def registered():
    registry.register_dataset("blobs", blobs,
                              features=lambda kwargs: {"num_classes": CLASSES})
    registry.register_model(
        "token_classifier", metrics=registry.classifier_metrics,
        build=lambda kwargs, data: TokenClassifier(
            data.features["num_classes"], **kwargs),
        evaluators=("calibration", "two_stage"))
    yield
    del registry.MODELS["token_classifier"], registry.DATASETS["blobs"]


def config():
    config = common.base_config()
    config.model = common.model("token_classifier", k=4, mlp_dim=32)
    config.data = ml_collections.ConfigDict({"name": "blobs"})
    config.batch_size = config.eval.batch_size = 16
    config.epochs, config.steps_per_epoch = 2, 4
    config.optimizer.warmup_steps = 1
    config.verbose = 0
    return config


def test_a_model_defined_here_trains_through_train(tmp_path, capsys):
    cfg = config()
    cfg.eval.two_stage.rank = 4
    cfg.eval.two_stage.candidates = 8
    report = training.train(cfg, str(tmp_path))
    assert capsys.readouterr().out == ""  # verbose 0: no printed report
    assert report["model"] == "token_classifier"
    assert report["train_steps"] == 8
    assert list(report["nonzero_fraction"]) == ["token_mlp"]
    assert 0 < report["nonzero_fraction"]["token_mlp"] <= 4 / 32
    assert 0 <= report["eval"]["expected_calibration_error"] <= 1
    assert report["two_stage"]["layers"].keys() == {"token_mlp"}
    # 8 candidates of mlp_dim 32: more than a sixth, so it never runs.
    assert report["two_stage"]["max_tokens"] == 0
    # The evaluators it lists ran: calibration wrote its TensorBoard run.
    assert os.listdir(tmp_path / "tensorboard" / "calibration")
    with open(tmp_path / "report.json") as f:
        assert json.load(f)["model"] == "token_classifier"


def test_an_evaluation_the_model_does_not_list_is_refused(tmp_path):
    cfg = config()
    cfg.eval.corruptions = ("gaussian_noise",)
    with pytest.raises(ValueError, match=r"config.eval.corruptions asks for "
                       r"the 'corruptions' evaluation.*'token_classifier'"):
        training.train(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # refused before writing


@pytest.mark.parametrize("section, key", [("model", "config.model.name"),
                                          ("data", "dataset")])
def test_unknown_names_list_the_registered_ones(tmp_path, section, key):
    cfg = config()
    cfg[section].name = "nope"
    with pytest.raises(ValueError, match=rf"Unknown {re.escape(key)} 'nope': "
                       r"choose one of \[.*'(blobs|token_classifier)'"):
        training.train(cfg, str(tmp_path))


def test_training_names_no_model_and_no_dataset():
    source = inspect.getsource(training)
    for name in (*registry.MODELS, *registry.DATASETS):
        assert not re.search(rf"\b{name}\b", source, re.IGNORECASE), name


@pytest.mark.parametrize("name, model_class", [
    ("vit_digits", "ViT"), ("vit_cifar10", "ViT"), ("vit_b16_imagenet", "ViT"),
    ("t5_synthetic", "T5"), ("t5_small_c4", "T5"), ("t5_base_c4", "T5"),
    ("t5_wmt", "T5")])
def test_every_model_argument_is_a_config_key(name, model_class):
    """`--config.model.<argument>` sets any argument of the model a user
    may choose; what the data decides (sizes, vocabulary) and the dtype
    (`config.mixed_precision`) are not keys."""
    from tests.runs import load_config
    from topk_sparse import models
    from_data = {"image_size", "channels", "num_classes", "vocab_size",
                 "dtype", "kwargs", "self"}
    arguments = set(inspect.signature(
        getattr(models, model_class).__init__).parameters) - from_data
    config = load_config(name)
    assert arguments <= set(config.model), sorted(
        arguments - set(config.model))


def _imports(path):
    """The `topk_sparse` modules that the file at `path` imports."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update([node.module] + [f"{node.module}.{alias.name}"
                                          for alias in node.names])
    return {name for name in found if name.startswith("topk_sparse")}


def test_models_and_data_do_not_import_each_other_nor_evaluation_models():
    """The data side and the models meet only in the trainer (and share
    `topk_sparse.vocabulary`); evaluators know no model."""
    import glob
    package = os.path.dirname(registry.__file__)
    for side, other in (("models", "data"), ("data", "models")):
        for path in glob.glob(os.path.join(package, side, "*.py")):
            bad = {name for name in _imports(path)
                   if name.startswith(f"topk_sparse.{other}")}
            assert not bad, (path, bad)
    assert not {name for name in _imports(
        os.path.join(package, "evaluation.py"))
        if name.startswith("topk_sparse.models")}
