"""llama.cpp's side. In: a GGUF and tokens (lib, ggml_struct, runner; worker isolates crashes).
Out: llama.cpp's trace: its graph nodes at our sites, copied out by the eval callback (capture).
"""
