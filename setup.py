"""Install FIRM: `pip install -e .[dev]` (CPU torch first: `pip install torch==2.13.0`)."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

install_requires = [
    # Pinned loosely: torch is installed first by the Makefile (CPU build); a range here must not pull a CUDA build.
    "torch>=2.4",
    "lightning>=2.4",
    "triton>=3.0; platform_system == 'Linux'",
    "transformers>=4.57",  # Qwen3-VL
    "diffusers>=0.37",  # the first release with every pipeline class the families use (Flux2KleinPipeline)
    "peft>=0.17",
    "torchmetrics>=1.4",
    "torchdata>=0.10",  # StatefulDataLoader: exact data position on resume
    "omegaconf>=2.3",
    "pyyaml>=6",
    "webdataset>=0.2.100",
    "safetensors>=0.4",
    "pillow>=10",
    "numpy>=1.26",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "httpx>=0.27",  # async OpenAI-compatible critic client
    "litserve>=0.2.10",  # `firm critic serve`
]

extras_require = {
    # hypothesis: tests/fuzz; openai: the official client, tested against `firm critic serve`;
    # pytest-xdist: `make test` runs two workers (one per core of the CI machines)
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff>=0.6", "hypothesis>=6.100", "openai>=1.40"],
    "gpu": ["flash-attn>=2.6"],
}

setup(
    name="firm",
    version="0.1.0",
    description="Faithful image reward modeling and RL for image editing and text-to-image models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # One import root: everything FIRM ships imports as firm.* (a generic top-level name such as `kernels` collides
    # with other packages; Hugging Face's `kernels` did, through transformers 5.25).
    # experiments/ ships as package data, firm/experiments/ in an installed wheel (firm/paths.py finds it either way).
    packages=[*find_packages(include=["firm", "firm.*"]), "firm.experiments"],
    package_dir={"firm.experiments": "experiments"},
    package_data={
        # The shapes world's tiny pretrained base models (a few MB of safetensors + configs).
        "firm.synthetic": [
            "checkpoints/README.md",
            "checkpoints/*/*.json",
            "checkpoints/*/*.safetensors",  # the critic base (shapes_critic): save_pretrained at the top level
            "checkpoints/*/*.jinja",
            "checkpoints/*/*/*",
        ],
        # `firm plan`: the architectures (config.json files, no weights) of the checkpoints the experiments train.
        "firm.plan": ["configs/README.md", "configs/*/*.json", "configs/*/*/*.json"],
        "firm.experiments": [f"**/*.{ext}" for ext in ("yaml", "txt", "sh", "json", "jsonl", "png", "safetensors")],
    },
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["firm=firm.cli:main"]},
    license="Apache-2.0",
)
