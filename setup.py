"""Package definition for spellm-ds."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="spellm-ds",
    version="0.1.0",
    description="Self-distillation of BPE language models into SpeLLM char-head models on DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["spellm_ds", "spellm_ds.*"]),
    include_package_data=True,
    install_requires=[
        # No torch pin here: cluster users bring their CUDA build; the local CPU pin lives in
        # requirements/cpu-constraints.txt and is applied by scripts/setup_env.sh only.
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.45",
        "accelerate>=1.1.0",
        "webdataset>=0.2.100",
        "tensorboard>=2.15",
        "zstandard>=0.22",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy>=1.24",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        # parquet corpora for build-shards --input *.parquet
        "pyarrow>=14",
        # eval writes the accuracy/fallback-vs-threshold plot as PNG
        "matplotlib>=3.7",
        # import-gguf reads GGUF files through transformers, which needs the gguf package for that
        "gguf>=0.10",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "ruff>=0.6", "pre-commit>=3.5"],
        # lm-evaluation-harness: the `spellm` model (spellm_ds.eval.harness) and `spellm-ds lm-eval-local`
        "eval": ["lm-eval>=0.4.10,<0.5"],
    },
    entry_points={"console_scripts": ["spellm-ds=spellm_ds.cli:run"]},
)
