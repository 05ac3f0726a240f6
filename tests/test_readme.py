"""The README stays true: its Python example runs, and its site table names every site."""
import pathlib
import re

from harness.sites import SITES

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_python_example_runs(tiny_f32):
    block = README.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(compile(block.replace('"model.gguf"', repr(str(tiny_f32))), "README.md", "exec"), ns)
    assert ns["trace"][0, "blk.0.q_rope"].shape == (3, 4, 64)
    assert len(ns["logits"]) == 5                              # prefill + 4 decode steps
    assert (ns["run"].first.step, ns["run"].first.site) == (0, "blk.0.q")   # the injected bias drop


def test_site_table_names_every_site():
    table = README.split("## What it compares", 1)[1].split("## How a divergence", 1)[0]
    named = set(re.findall(r"`(?:blk\.i\.)?([a-z_]+)`", table))
    assert {s.key for s in SITES} <= named, {s.key for s in SITES} - named
