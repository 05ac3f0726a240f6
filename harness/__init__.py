"""llamadiff: diff a hooked PyTorch Qwen2 against llama.cpp, op by op, on the same GGUF."""
__version__ = "0.1.0"
