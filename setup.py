"""topk_sparse: Top-k sparse Transformer MLPs for Keras 3 (TensorFlow, JAX)."""

from setuptools import find_packages, setup

# TensorFlow comes through an extra, never as a hard requirement: TPU VMs run
# the `tensorflow-tpu` distribution, and a plain `tensorflow` requirement
# would install a second TensorFlow over it. 2.20 is the newest release with
# a TPU wheel and the one tf-models-official 2.20 pins.
TENSORFLOW = {
    "cpu": ["tensorflow-cpu~=2.20.0"],
    "gpu": ["tensorflow[and-cuda]~=2.20.0"],
    "tpu": ["tensorflow-tpu~=2.20.0"],
}

setup(
    name="topk_sparse",
    version="0.1.0",
    description="Top-k sparse Transformer MLPs (The Lazy Neuron Phenomenon) "
                "for Keras 3 on TensorFlow and JAX, TPU-first.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ (the trainers' --config files) installs as topk_sparse.configs,
    # so that notebooks and user code import them without a checkout, and
    # trainers/ (the binaries) as topk_sparse.trainers, with console scripts.
    packages=[*find_packages(include=["topk_sparse", "topk_sparse.*"]),
              "topk_sparse.configs", "topk_sparse.trainers"],
    package_dir={"topk_sparse.configs": "configs",
                 "topk_sparse.trainers": "trainers"},
    entry_points={"console_scripts": [
        f"topk-sparse-{name}=topk_sparse.trainers.{name}:main"
        for name in ("vit", "t5", "study")]},
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.10,<4",
        # TensorFlow 2.21 no longer installs TensorBoard, and tf.summary
        # raises without it.
        "tensorboard>=2.20",
        "numpy>=1.26",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        # Data: TFDS pipelines (cifar10, imagenet2012, c4, wmt, CIFAR-10-C)
        # and the embedded default, scikit-learn's handwritten digits.
        "tensorflow-datasets>=4.9",
        "scikit-learn>=1.3",
        # Reliability diagrams (TensorBoard images) and the study's plots.
        "matplotlib>=3.7",
        # The study's t-intervals (scikit-learn needs it too).
        "scipy>=1.10",
    ],
    extras_require={
        **TENSORFLOW,
        # The JAX backend (KERAS_BACKEND=jax): layers, metrics, models,
        # fit, generate and saving without TensorFlow. On a TPU VM or a
        # GPU, install JAX's own build for it (jax[tpu], jax[cuda12]).
        "jax": ["jax>=0.4.30"],
        # Pillow (and scipy): references the corruption tests compare with.
        # pytest-xdist: the README's test command runs the suite on every
        # core (notebook kernels and subprocess trainings side by side).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
                 "pillow>=10",
                 # XLA's own approx_max_k bin count (tests/test_ops.py).
                 "jax[cpu]>=0.4.30",
                 # Runs colab/*.ipynb top to bottom (tests/test_notebooks.py).
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        # Integrations (topk_sparse/integrations). Both pull the `tensorflow`
        # package itself: install them WITHOUT `cpu`/`gpu`/`tpu`, or a
        # second TensorFlow lands in the same folder (tensorflow and
        # tensorflow-cpu) or TensorFlow 2.21 replaces 2.20.
        "garden": ["tf-models-official==2.20.0", "tf-keras~=2.20.0"],
        # tensorflow-text (a keras-hub requirement) pinned to 2.20, else
        # it brings TensorFlow 2.21. keras-hub: the tested release (the
        # integration reaches into its model layers).
        "hub": ["keras-hub[grain]~=0.32.0", "tensorflow-text~=2.20.0"],
    },
    license="Apache-2.0",
)
