"""Comparison. In: two traces, ours and llama.cpp's, and ours anchored on its inputs (local errors).
Out: a Comparison: divergence table, logit checks, first divergent op (comparator, metrics, tolerance).
"""
