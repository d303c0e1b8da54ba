"""fvlm-jax: fine-grained CT vision-language pre-training (fVLM, ICLR 2025) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="fvlm-jax",
    version="0.1.0",
    description="Anatomy-level CT vision-language pre-training (fVLM) in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["fvlm_jax", "fvlm_jax.*", "input_pipeline", "input_pipeline.*", "configs"]),
    install_requires=[
        # Tested with jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8, TF 2.21, tfds 4.9.10.
        "jax>=0.10,<0.12",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml-collections>=1.1,<2",
        "numpy>=2.0,<3",
        "scipy>=1.14,<2",
        "nibabel>=5.3,<6",
        "pydicom>=3.0,<4",
        "sentencepiece>=0.2,<0.3",
        "scikit-learn>=1.6,<2",
        "tqdm>=4.66,<5",
        "absl-py>=2.1,<3",
        "matplotlib>=3.9,<4",
        "tensorboardX>=2.6,<3",  # TensorBoard event files without TensorFlow
        # Preparation and the tf.data input pipeline (input_pipeline/ only; the model runs without them).
        "tensorflow-cpu>=2.19,<2.22",
        "tensorflow-datasets>=4.9.8,<4.10",
    ],
    extras_require={
        "gpu": ["jax[cuda12]>=0.10,<0.12"],
        "tpu": ["jax[tpu]>=0.10,<0.12"],
        # Preparation as an Apache Beam pipeline (data.runner="beam"); tested with 2.77 (it pins protobuf < 7,
        # which TensorFlow 2.21 accepts). Its dask extra: the DaskRunner on a dask.distributed cluster (tested with
        # dask/distributed 2026.8; 3.2 MB of wheels).
        "beam": ["apache-beam[dask]>=2.70,<3"],
        # Pretrained encoders (model.text.init, model.vision.init): BERT's WordPiece and .safetensors weights.
        # Reading a PyTorch .pth / .bin also needs torch (CPU build). Tested with tokenizers 0.23.3, safetensors 0.8.0.
        "pretrained": ["tokenizers>=0.20,<1", "safetensors>=0.4,<1"],
        # tests/test_pretrained.py builds its checkpoints with these (skipped without torch). Take torch's CPU build
        # (pip install torch --index-url https://download.pytorch.org/whl/cpu): PyPI's default is the CUDA one,
        # several GB. Tested with torch 2.13.0+cpu, transformers 5.25.0.
        "test_pretrained": ["torch>=2.4", "transformers>=4.40", "tokenizers>=0.20,<1", "safetensors>=0.4,<1"],
        # tensorboard: only its event reader, to check what TensorBoard shows of resumed runs' event files. The
        # test_pretrained packages: CI runs tests/test_pretrained.py (a CPU build of torch must be installed first).
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "ruff>=0.15,<0.18", "apache-beam[dask]>=2.70,<3",
                 "tensorboard>=2.18,<3", "torch>=2.4", "transformers>=4.40", "tokenizers>=0.20,<1",
                 "safetensors>=0.4,<1"],
    },
)
