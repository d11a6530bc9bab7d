#!/usr/bin/env bash
# CI for topk_sparse.integrations: Model Garden (tf_keras) and keras-hub,
# each in a fresh virtual environment of its own (build/venv-garden,
# build/venv-hub; build/ is git-ignored), installed by the README's lines.
# Both libraries pull the `tensorflow` package itself, so the extras are
# installed without `cpu`: this script fails unless each environment holds
# exactly one TensorFlow distribution, 2.20, that imports.
#
# Two environments, not one: tf-models-official 2.20 holds numpy below 2,
# which holds JAX at 0.7 (seen here), while keras-hub is tested on the JAX
# users install. One after the other: two editable installs of one
# checkout at once would write its topk_sparse.egg-info concurrently. Measured from scratch with
# an empty pip cache, on a 2-core machine shared with other jobs: 354 s
# (installs 228 s, tests 49 s + 63 s).
set -euo pipefail
cd "$(dirname "$0")/.."

install() {  # name extras: makes build/venv-$name with those extras
    local venv="build/venv-$1"
    python3 -m venv --clear "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # pytest-xdist: pytest.ini's --dist option (the test extra's).
    "$venv/bin/pip" install -q -e ".[$2]" "pytest>=8" "pytest-xdist>=3.5"
}

check_one_tensorflow() {  # name
    local venv="build/venv-$1" found
    # TensorFlow's distributions, not its companions (tensorflow-text,
    # tensorflow-datasets, ...).
    found=$("$venv/bin/pip" list 2>/dev/null \
        | grep -iE '^tensorflow([-_](cpu|gpu|tpu|intel|macos))? ' || true)
    echo "$1: ${found//$'\n'/; }"
    if [ "$(printf '%s\n' "$found" | grep -c .)" -ne 1 ]; then
        echo "$1: expected exactly one TensorFlow distribution" >&2
        exit 1
    fi
    TF_CPP_MIN_LOG_LEVEL=2 "$venv/bin/python" -c \
        "import tensorflow as tf; assert tf.__version__.startswith('2.20.'), tf.__version__"
}

start=$SECONDS
install garden garden
check_one_tensorflow garden
install hub hub,jax  # keras-hub on both Keras backends
check_one_tensorflow hub
echo "integrations: installed in $((SECONDS - start)) s"
build/venv-garden/bin/python -m pytest -q -n 2 -p no:cacheprovider \
    tests/integrations/test_model_garden.py
echo "integrations: Model Garden done at $((SECONDS - start)) s"
for backend in tensorflow jax; do
    KERAS_BACKEND=$backend build/venv-hub/bin/python -m pytest -q -n 2 \
        -p no:cacheprovider tests/integrations/test_keras_hub.py
    echo "integrations: keras-hub on $backend done at $((SECONDS - start)) s"
done
echo "integrations: $((SECONDS - start)) s in all"
