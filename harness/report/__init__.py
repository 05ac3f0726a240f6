"""Reports. In: a Comparison (or a DiffResult with its traces, for the plots).
Out: strings and figures: table, markdown, JSON (text), one HTML page (html), PNGs (plots).
"""
