"""Test session setup: two logical CPUs, before TensorFlow starts."""

import tests.devices  # noqa: F401
