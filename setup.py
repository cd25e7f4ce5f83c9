"""Packaging for dti_fast. The folder kernels/ installs as the subpackage dti_fast.kernels."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="dti-fast",
    version="0.1.0",
    description="Directional Textual Inversion for diffusers models, with a fused Riemannian SGD optimizer",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["dti_fast", "dti_fast.train", "dti_fast.testing", "dti_fast.world", "dti_fast.kernels"],
    package_dir={"dti_fast": "dti_fast", "dti_fast.kernels": "kernels"},
    include_package_data=True,
    package_data={
        "dti_fast": [
            "assets/clip_tokenizer/*",
            "assets/dreambooth_mini/*.txt",
            "assets/dreambooth_mini/*/*",
            "assets/*.json",
            "assets/world_base/*.json",
            "assets/world_base/*/*",
        ]
    },
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "diffusers>=0.30",
        "transformers>=4.44",
        "bitsandbytes>=0.43",
        "safetensors>=0.4",
        "pillow>=10.0",
        "tqdm>=4.60",
        "numpy>=1.24",
        "sentencepiece>=0.1.99",  # SigLIP's tokenizer (text-fidelity metric)
        "protobuf>=3.20",  # required by transformers' SiglipTokenizer
    ],
    extras_require={
        "dev": [
            "pytest>=7.4",
            "pytest-benchmark>=4.0",
            "hypothesis>=6.0",
            "geoopt>=0.5",
            "ruff>=0.6",
            "accelerate>=0.30",
            "tensorboard>=2.10",
        ],
        "tracking": ["accelerate>=0.30", "tensorboard>=2.10"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["dti-fast = dti_fast.cli:entry"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
