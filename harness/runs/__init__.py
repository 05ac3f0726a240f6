"""Traces on disk and the CI gate. In: a trace or a llama.cpp capture (record, writer); a run folder.
Out: a validated run and its comparison (store); the gate's pass/fail, JUnit and markdown (gate).
"""
