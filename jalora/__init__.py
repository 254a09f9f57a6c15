"""jalora: LoRA / QLoRA fine-tuning for Japanese LLMs."""

__version__ = "0.1.0"
