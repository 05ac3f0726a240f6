"""Hugging Face transformers as a candidate. In: a GGUF (read and dequantized by transformers itself) and tokens.
Out: a trace of transformers' Qwen2/Qwen3 at our sites, prefill plus decode with its own KV cache (trace).
"""
