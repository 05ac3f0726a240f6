"""Our side. In: a GGUF's weights and, optionally, faults to inject (inject, faults).
Out: our PyTorch trace at every site (model, hooks; numerics mirrors llama.cpp's roundings).
"""
