"""Taking a run elsewhere: a merged 16-bit model, GGUF for llama.cpp, an Ollama Modelfile."""
