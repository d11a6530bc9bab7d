"""A run's training state in one file, consistent after a kill at any instant.

`<workdir>/backup/state.weights.h5` holds everything a resumed run needs,
so that its parts cannot disagree:

- the model's weights and the optimizer's variables, its step count
  included (Keras's `save_weights`): the epoch to resume from is
  `optimizer.iterations // steps_per_epoch`, never stored apart;
- the model's other state: the dropout seed generators, so that a resumed
  run draws the masks an uninterrupted one would;
- the run's progress: the per-epoch `fit` history, the training time
  spent so far and the Keras backend that trained it (JSON in an HDF5
  attribute): a run resumes on its own backend only (`check_backend`),
  since the backends' float kernels and dropout masks differ.

A backup is written under a temporary name and renamed into place; the one
it replaces is kept as `previous.weights.h5` until the next backup. So a
kill at any instant leaves `state.weights.h5` (or, between the two renames,
only `previous.weights.h5`) whole. A file that cannot be read is never
skipped silently: `restore` raises, naming it and what to do.
"""

import json
import os
import tempfile
import time

from absl import logging
import h5py
import keras
import numpy as np
import tensorflow as tf

from topk_sparse import checks, sparsity

LATEST = "state.weights.h5"
PREVIOUS = "previous.weights.h5"
_TEMPORARY = "writing.weights.h5"  # Keras wants the .weights.h5 suffix
_GROUP = "topk_sparse"


def _other_state(model):
    """The model's variables that `save_weights` leaves out (dropout seed
    generators), in a fixed order; not the sparsity metrics' counts, which
    `fit` resets at every epoch."""
    saved = {id(v) for v in (*model.weights, *sparsity.metric_state(model))}
    return [v for v in model.variables if id(v) not in saved]


def save(model, directory, progress):
    """Writes the model's training state and `progress` (a JSON-able dict)
    to `<directory>/state.weights.h5`, atomically."""
    tf.io.gfile.makedirs(directory)
    local = "://" not in directory
    scratch = None if local else tempfile.mkdtemp()
    temporary = os.path.join(directory if local else scratch, _TEMPORARY)
    model.save_weights(temporary, overwrite=True)
    with h5py.File(temporary, "a") as f:
        group = f.create_group(_GROUP)
        group.attrs["progress"] = json.dumps(progress)
        for i, variable in enumerate(_other_state(model)):
            group.create_dataset(f"state_{i}", data=variable.numpy())
    if not local:  # object stores: copy up, then rename there
        remote = os.path.join(directory, _TEMPORARY)
        tf.io.gfile.copy(temporary, remote, overwrite=True)
        tf.io.gfile.rmtree(scratch)
        temporary = remote
    latest = os.path.join(directory, LATEST)
    if tf.io.gfile.exists(latest):
        tf.io.gfile.rename(latest, os.path.join(directory, PREVIOUS),
                           overwrite=True)
    tf.io.gfile.rename(temporary, latest, overwrite=True)


def restore(model, directory):
    """Loads the backup in `directory` into `model` (built, compiled, its
    optimizer built) and returns its progress dict, or None if there is no
    backup.

    Raises:
      RuntimeError: the backup cannot be read, naming the file and what to
        do (never a silent fresh start).
    """
    path = os.path.join(directory, LATEST)
    if not tf.io.gfile.exists(path):
        path = os.path.join(directory, PREVIOUS)
        if not tf.io.gfile.exists(path):
            return None
        # A kill between the two renames of `save` leaves only this one.
        logging.warning("No %s in %s: resuming from %s.", LATEST, directory,
                        PREVIOUS)
    try:
        model.load_weights(path)
        with tf.io.gfile.GFile(path, "rb") as f, h5py.File(f, "r") as h5:
            group = h5[_GROUP]
            progress = json.loads(group.attrs["progress"])
            others = _other_state(model)
            if len(group) != len(others):
                raise ValueError(f"it holds {len(group)} state variables, "
                                 f"the model has {len(others)}")
            for i, variable in enumerate(others):
                variable.assign(np.asarray(group[f"state_{i}"]))
    except Exception as e:  # pylint: disable=broad-except
        previous = os.path.join(directory, PREVIOUS)
        hint = (f", or move {previous} over it to resume one backup earlier"
                if path != previous and tf.io.gfile.exists(previous) else "")
        raise RuntimeError(
            f"Backup {path} cannot be read ({type(e).__name__}: {e}). "
            f"Backups are renamed into place whole, so something else "
            f"changed it: delete it to train this workdir from scratch"
            f"{hint}.") from e
    return progress


def check_backend(progress, directory):
    """Raises if the backup's `progress` (what `restore` returned) was
    written under another Keras backend: resumed there, the run would not
    give the report of an uninterrupted one."""
    # Backups from before the backend was recorded are TensorFlow's.
    written = (progress or {}).get("backend", "tensorflow")
    if progress is not None and written != keras.config.backend():
        raise checks.ConfigError(
            f"The backup in {directory} was written under KERAS_BACKEND="
            f"{written}, this process runs {keras.config.backend()}: resume "
            f"it with KERAS_BACKEND={written}, or use another --workdir.")


class Backup(keras.callbacks.Callback):
    """Saves the training state after every epoch (`save`), with the run's
    history so far; `restore` gives it back.

    Args:
      directory: str. The backup folder.
      progress: dict or None. What `restore` returned (None: a new run):
        the earlier epochs' history and training time.
    """

    def __init__(self, directory, progress=None):
        super().__init__()
        self.directory = directory
        progress = progress or {}
        self.history = {k: list(v) for k, v in
                        progress.get("history", {}).items()}
        self.train_time_s = float(progress.get("train_time_s", 0.0))
        self._since = None

    def on_train_begin(self, logs=None):
        self._since = time.time()

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        now = time.time()
        self.train_time_s += now - self._since
        self._since = now
        save(self.model, self.directory,
             {"history": self.history, "train_time_s": self.train_time_s,
              "backend": keras.config.backend()})
