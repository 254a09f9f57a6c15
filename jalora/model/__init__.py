"""A tokenizer and a LoRA-ready model: loading (none / 8-bit / 4-bit / GGUF), tokenizer repair, LoRA, checks."""
