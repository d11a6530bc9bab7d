#!/usr/bin/env bash
# CI for topk_sparse.integrations: Model Garden (tf_keras) and keras-hub,
# in one fresh virtual environment (build/venv-integrations; build/ is
# git-ignored), installed by the README's line. Both libraries pull the
# `tensorflow` package itself, so the extras are installed without `cpu`:
# this script fails unless the environment holds exactly one TensorFlow
# distribution, 2.20, that imports. One environment, not one per library:
# TensorFlow is installed once (tf-models-official 2.20 and keras-hub 0.32
# with tensorflow-text 2.20 resolve to the same TensorFlow 2.20).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=build/venv-integrations
start=$SECONDS
python3 -m venv --clear "$venv"
"$venv/bin/pip" install -q --upgrade pip
# pytest-xdist: pytest.ini's --dist option (the test extra's).
"$venv/bin/pip" install -q -e ".[garden,hub,jax]" "pytest>=8" "pytest-xdist>=3.5"

# TensorFlow's distributions, not its companions (tensorflow-text,
# tensorflow-datasets, ...).
found=$("$venv/bin/pip" list 2>/dev/null \
    | grep -iE '^tensorflow([-_](cpu|gpu|tpu|intel|macos))? ' || true)
echo "integrations: ${found//$'\n'/; }"
if [ "$(printf '%s\n' "$found" | grep -c .)" -ne 1 ]; then
    echo "integrations: expected exactly one TensorFlow distribution" >&2
    exit 1
fi
TF_CPP_MIN_LOG_LEVEL=2 "$venv/bin/python" -c \
    "import tensorflow as tf; assert tf.__version__.startswith('2.20.'), tf.__version__"
echo "integrations: installed in $((SECONDS - start)) s"

"$venv/bin/python" -m pytest -q -n 2 -p no:cacheprovider \
    tests/integrations/test_model_garden.py
echo "integrations: Model Garden done at $((SECONDS - start)) s"
for backend in tensorflow jax; do
    KERAS_BACKEND=$backend "$venv/bin/python" -m pytest -q -n 2 \
        -p no:cacheprovider tests/integrations/test_keras_hub.py
    echo "integrations: keras-hub on $backend done at $((SECONDS - start)) s"
done
echo "integrations: $((SECONDS - start)) s in all"
