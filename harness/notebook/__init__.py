"""The drill-down. In: a GGUF, or recorded traces and runs (storage: read on demand).
Out: a Drilldown to explore in Jupyter: tables, tensor pairs, worst elements, hints, plots (run, views).
"""
