"""Reads TensorBoard event files back, for tests of what was written."""

import glob
import os

import tensorflow as tf


def read_events(log_dir):
    """`({tag: [(step, ndarray)]}, {tag: plugin name})` from the event files
    directly in `log_dir`, in file then write order."""
    events, plugins = {}, {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                events.setdefault(value.tag, []).append(
                    (event.step, tf.make_ndarray(value.tensor)))
                if value.metadata.plugin_data.plugin_name:
                    plugins[value.tag] = value.metadata.plugin_data.plugin_name
    return events, plugins


def read_scalars(log_dir):
    """`{tag: {step: value}}` of the scalar summaries in `log_dir`."""
    events, _ = read_events(log_dir)
    return {tag: {step: float(array) for step, array in values}
            for tag, values in events.items()
            if all(array.ndim == 0 for _, array in values)}
