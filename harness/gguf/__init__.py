"""The GGUF file. In: a path (header, load; the architecture's ArchSpec from arch).
Out: a ModelConfig and dequantized weights (load, dequant on the GPU) for both engines' sides.
"""
