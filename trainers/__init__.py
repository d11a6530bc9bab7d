"""absl-flag training binaries: `python -m trainers.vit`, `trainers.t5`,
`trainers.study`.

Each has two flags, as in big_vision: `--config` (a configs/*.py file,
locked, with fields overridable as `--config.model.k=32`) and `--workdir`.
Everything else lives in the config; the work is `topk_sparse.training`.

The package installs as `topk_sparse.trainers` (beside `configs/` as
`topk_sparse.configs`), with the console scripts `topk-sparse-vit`,
`topk-sparse-t5` and `topk-sparse-study`: an installed package runs the
same binaries with the same flags, `python -m topk_sparse.trainers.vit`,
and there `--config=configs/<file>` names the package's own config.
"""

import contextlib
import difflib
import importlib.util
import os
import sys
import tempfile

# TensorFlow's C++ INFO lines (CPU features, end of each dataset pass):
# warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app
from absl import flags
from ml_collections import config_flags

_default_config = None
_flags = None
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs")


def define_flags(default_config):
    """Defines `--config` (default `configs/<default_config>`) and
    `--workdir` (default: one folder per trained config, see
    `default_workdir`)."""
    global _default_config, _flags
    _default_config = os.path.join(CONFIGS, default_config)
    # Without --config, the default file and the overrides are parsed here,
    # when the flag is defined, rather than in app.run.
    with _clear_override_errors():
        config = config_flags.DEFINE_config_file(
            "config", _default_config,
            "Training config file, optionally with an argument: "
            "configs/vit_digits.py:runlocal.", lock_config=True)
    workdir = flags.DEFINE_string(
        "workdir", None,
        "Folder for config.json, TensorBoard logs, the backup a killed run "
        "resumes from, report.json and model.keras. Default: "
        "<tmp>/topk_sparse/<model>_<data>-<hash of the trained config>, one "
        "per config, so that runs of different configs never share one.")
    _flags = (config, workdir)


def run(model_name):
    """Parses the flags and trains the config, whose `model.name` must be
    `model_name`; config override errors list the valid keys."""
    tf = import_tensorflow()

    from topk_sparse import checks, training

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        config = _flags[0].value
        try:
            config.model  # pylint: disable=pointless-statement
        except OSError as e:  # ml_collections defers a failed load to here
            _fail(_config_file_message(sys.argv, e))
        workdir = _flags[1].value
        if config.model.name != model_name:
            raise app.UsageError(
                f"trainers.{model_name} trains config.model.name="
                f"{model_name!r}, got {config.model.name!r}: use "
                f"trainers.{config.model.name}.")
        if workdir is None:
            workdir = default_workdir(config)
            print(f"--workdir={workdir}", flush=True)
        try:
            training.train(config, workdir)
        except checks.ConfigError as e:
            sys.stderr.write(f"FATAL config error: {e}\n")
            sys.exit(1)

    # tf.distribute logs every all-reduce at INFO: keep the log readable.
    tf.get_logger().setLevel("WARNING")
    app.run(main, flags_parser=parse_flags)


def import_tensorflow():
    """TensorFlow, which the trainers need on either backend (tf.data and
    TFDS input, TensorBoard); exits with one line where it is missing."""
    try:
        import tensorflow as tf
    except ImportError:
        sys.exit("FATAL the trainers read their data with tf.data and write "
                 "TensorBoard logs: install TensorFlow beside JAX, "
                 "pip install -e \".[cpu,jax]\".")
    return tf


def parse_flags(argv):
    """absl's flag parsing with one-line errors, `--config=configs/<file>`
    resolved by `_packaged_config_arg`."""
    argv = [_packaged_config_arg(item) for item in argv]
    with _clear_override_errors(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            _fail(str(e))


def _packaged_config_arg(item):
    """`--config=configs/<file>[:arg]` as the package's own config file
    where the working folder has no such file (an installed package, run
    outside a checkout); any other argument as it is."""
    flag, equals, spec = item.partition("=")
    path, colon, arg = spec.partition(":")
    packaged = os.path.join(CONFIGS, os.path.basename(path))
    if (flag in ("--config", "-config") and equals
            and os.path.dirname(path) == "configs"
            and not os.path.exists(path) and os.path.exists(packaged)):
        return f"{flag}={packaged}{colon}{arg}"
    return item


@contextlib.contextmanager
def _clear_override_errors(argv=None):
    """Turns ml_collections' override errors into one line and exit 1.

    For an override of an unknown key it raises these raw, with a traceback
    and only the bad name: `AttributeError: "'kk'"`.
    """
    argv = sys.argv if argv is None else argv
    try:
        yield
    except (AttributeError, KeyError) as e:
        _fail(_unknown_key_message(argv) or f"{type(e).__name__}: {e}")
    except config_flags.config_flags.UnsupportedOperationError as e:
        _fail(str(e))


WORKDIR_ROOT = "topk_sparse-runs"
"""The default workdirs' folder in the system's temp folder. Not an
importable name: a folder `topk_sparse` there would be a namespace package
that shadows the installed one for Python started in that folder."""


def default_workdir(config):
    """`<tmp>/topk_sparse-runs/<model>_<data>-<fingerprint>`: the
    fingerprint hashes what the config trains
    (`workdir.config_fingerprint`), so a changed model, data or recipe key
    gets its own folder and a changed evaluation key does not."""
    from topk_sparse.workdir import config_fingerprint

    return os.path.join(
        tempfile.gettempdir(), WORKDIR_ROOT,
        f"{config.model.name}_{config.data.name}-"
        f"{config_fingerprint(config)}")


def _config_file_message(argv, error):
    """One line for a `--config` file that could not be loaded."""
    spec = _config_spec(argv)
    path = str(spec).partition(":")[0]
    if not os.path.exists(path):
        known = sorted(name for name in os.listdir(CONFIGS)
                       if name.endswith(".py") and not name.startswith("_")
                       and name != "common.py")
        return (f"--config={spec}: no such file. Configs here: "
                f"{', '.join(os.path.join('configs', n) for n in known)}.")
    cause = error.__cause__ or error
    return f"--config={spec} could not be loaded: {cause}"


def _fail(message):
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     f"Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def _unknown_key_message(argv):
    """Names the first `--config.<path>` override whose path does not exist,
    with the keys valid at that level."""
    spec = _config_spec(argv)
    path, _, arg = str(spec).partition(":")
    try:
        values = _load_config(path, arg)
    except Exception:  # pylint: disable=broad-except
        return None  # the config itself fails: let its own error show
    for item in argv[1:]:
        name = item.lstrip("-").split("=", 1)[0]
        if not name.startswith("config."):
            continue
        node, parts = values, name.split(".")[1:]
        for depth, part in enumerate(parts):
            keys = sorted(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(["config", *parts[:depth]])
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f' Did you mean "{close[0]}"?' if close else ""
                return (f"Unknown config key {part!r} in --{name} (config "
                        f"file {path}).{hint} Valid keys of {where}: "
                        f"{', '.join(keys) or '(none: not a section)'}.")
            node = node[part]
    return None


def _load_config(path, arg):
    """`get_config(arg)` of the config file at `path`, loaded as
    config_flags loads it (a module from a file path)."""
    spec = importlib.util.spec_from_file_location("config_for_errors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([arg] if arg else []))


def _config_spec(argv):
    """The value given to `--config`, else the binary's default config."""
    for i, item in enumerate(argv):
        if item.startswith(("--config=", "-config=")):
            return item.split("=", 1)[1]
        if item in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return _default_config
