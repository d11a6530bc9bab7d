r"""Runs the Lazy Neuron study: a grid of ViT and T5 trainings, aggregated.

    python -m trainers.study --config=configs/study.py --workdir=/tmp/study
    python -m trainers.study --config=configs/study.py:quick \
        --workdir=/tmp/study_quick                     # minutes

Each run trains in `<workdir>/runs/<run>`; a run with a report.json is
skipped, so a killed study started again resumes. The workdir then holds
study.json, README.md (the results page) and the plots
(`topk_sparse.study`). Two processes
may share the grid (`nice -n 19 python -m trainers.study ... &` twice); then
aggregate with `--config.train=False` once both have ended.
"""

import os

# First: quiets TensorFlow's C++ INFO lines.
from . import CONFIGS, import_tensorflow, parse_flags

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(CONFIGS, "study.py"),
    "Study config file, optionally with an argument: configs/study.py:quick.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for the runs and the study's outputs.",
    required=True)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    tf = import_tensorflow()

    from topk_sparse import study

    tf.get_logger().setLevel("WARNING")
    summary = study.run(_CONFIG.value, _WORKDIR.value,
                        log=lambda line: print(line, flush=True))
    if summary is None:
        return  # other processes still train runs of this study
    print(study.tables(summary), flush=True)
    print(f"Study: {_WORKDIR.value}/README.md, study.json, *.png",
          flush=True)


def main():
    """The console script `topk-sparse-study`."""
    app.run(_main, flags_parser=parse_flags)


if __name__ == "__main__":
    main()
