"""TFDS datasets offline, for the pipeline tests.

`mocked_tfds` makes datasets look prepared in a data_dir (their metadata
written, as `tfds build` would) and makes up every record with
`tfds.testing.mock_data`: the library's "not prepared" check passes and no
download happens.
"""

import contextlib

import tensorflow_datasets as tfds


@contextlib.contextmanager
def mocked_tfds(data_dir, names, num_examples=6):
    """Prepares `names` (TFDS names, `"name/config"` allowed) in `data_dir`
    and mocks their records while the context lasts; yields `data_dir`."""
    data_dir = str(data_dir)
    for name in names:
        builder = tfds.builder(name, data_dir=data_dir)
        builder.data_path.mkdir(parents=True)
        builder.info.write_to_directory(builder.data_path)
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir):
        yield data_dir
