"""The integration tests run only when named on the command line.

They need extra environments (Model Garden's tf_keras, keras-hub), each
with its own TensorFlow: `.ci/integrations.sh` makes them and runs
`pytest tests/integrations/test_model_garden.py` and
`test_keras_hub.py` there. The main suite (`pytest tests`, whose
environment has neither library) does not collect this folder, so it
neither fails nor skips because of it.
"""

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent


def _named(config):
    """Whether a command-line argument is this folder or a path in it."""
    for arg in config.args:
        path = pathlib.Path(config.invocation_params.dir, arg.split("::")[0])
        path = path.resolve()
        if path == _HERE or _HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if collection_path.resolve() != _HERE / "conftest.py" \
            and not _named(config):
        return True
    return None
