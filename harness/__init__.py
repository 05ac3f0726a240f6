"""llamadiff: diff a hooked PyTorch model against llama.cpp, op by op, on the same GGUF.

The stages, in the order data flows through them:
``gguf`` (read a file) -> ``ours`` (our PyTorch model, hooks, fault injection) and ``llama``
(llama.cpp and the capture of its tensors) -> two :class:`~harness.trace.Trace` s -> ``compare``
(aligned comparison, tolerances) -> ``report`` (text, JSON, HTML, plots). ``diff`` runs the whole
chain; ``runs`` stores traces and gates against them; ``notebook`` is the interactive drill-down.

``harness.drilldown(gguf, prompt=..., steps=..., inject=[...])`` is the notebook entry point
(:func:`harness.notebook.run.drilldown`). Importing ``harness`` stays cheap: nothing heavy
(torch, pandas, llama.cpp) is loaded until it is called.
"""
__version__ = "0.1.0"


def drilldown(*args, **kwargs):
    """Run llama.cpp and our model on a GGUF and compare them op by op: see
    :func:`harness.notebook.run.drilldown`."""
    from harness.notebook.run import drilldown as _drilldown
    return _drilldown(*args, **kwargs)
