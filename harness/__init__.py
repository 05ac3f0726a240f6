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
import os as _os

__version__ = "0.1.0"

# CUDA: PyTorch's allocator with expandable segments (read when torch first allocates on the GPU).
# A micro-batched long prompt allocates tensors that grow with every batch; with the default fixed
# segments a 32k-token report of Qwen2.5-0.5B F16 peaked 62.1 GiB above what the weights and caches
# held on an H100, with expandable ones 9.4 GiB (benchmarks/RESULTS.md, ninth session). A value the
# user set is kept.
_os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def drilldown(*args, **kwargs):
    """Run llama.cpp and our model on a GGUF and compare them op by op: see
    :func:`harness.notebook.run.drilldown`."""
    from harness.notebook.run import drilldown as _drilldown
    return _drilldown(*args, **kwargs)
