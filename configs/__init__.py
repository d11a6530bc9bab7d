"""Training configs, one file per run, for `--config=configs/<name>.py`."""
