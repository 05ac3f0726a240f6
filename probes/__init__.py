"""Reference-free probes and the fault zoo. In: one trace, ours or llama.cpp's (context); a GGUF (zoo).
Out: the invariants it breaks (checks); whether each registered fault is found where expected (zoo).
"""
