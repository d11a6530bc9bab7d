"""Prints README.md's two commands, the first two ```bash blocks.

`.ci/run` runs what this prints, and tests/test_packaging.py reads the
commands through it, so that CI runs exactly what the README says:

    python3 .ci/readme_commands.py 1   # installs and runs the main job
    python3 .ci/readme_commands.py 2   # installs and runs the tests
"""

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def commands(text=None):
    """The first two ```bash blocks of the README, each one command."""
    text = README.read_text(encoding="utf-8") if text is None else text
    blocks = re.findall(r"^```bash\n(.*?)^```$", text, re.S | re.M)[:2]
    if len(blocks) != 2 or any(len(b.strip().splitlines()) != 1
                               for b in blocks):
        raise SystemExit("README.md must start with two ```bash blocks of "
                         "one line each: the main job, then the tests.")
    return [block.strip() for block in blocks]


if __name__ == "__main__":
    print(commands()[int(sys.argv[1]) - 1])
