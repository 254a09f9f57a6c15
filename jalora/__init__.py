"""jalora: LoRA / QLoRA fine-tuning for Japanese LLMs."""

from jalora.quiet import quiet_imports

__version__ = "0.1.0"

quiet_imports()
