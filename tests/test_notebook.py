"""The notebook API (harness.drilldown -> harness.notebook.run.Drilldown) and notebooks/drilldown.ipynb, executed."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("llama_cpp")

import harness  # noqa: E402
from harness.notebook import run as notebook  # noqa: E402
from harness.notebook.storage import LazyTensors  # noqa: E402
from harness.sites import SiteError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "drilldown.ipynb"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def run(tiny_f32):
    return harness.drilldown(tiny_f32, prompt=PROMPT, steps=2, inject=["drop_qkv_bias"])


def test_import_harness_stays_cheap_and_drilldown_is_the_entry_point(run):
    code = "import sys, harness; assert 'torch' not in sys.modules and 'pandas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    import inspect
    from harness.notebook.run import drilldown
    assert inspect.signature(harness.drilldown).parameters.keys() <= {"args", "kwargs"}
    assert "inject" in inspect.signature(drilldown).parameters and isinstance(run, notebook.Drilldown)


def test_run_table_and_first(run):
    t = run.table
    assert isinstance(t, pd.DataFrame) and isinstance(t, notebook.DiffTable)
    assert len(t) == run.comparison.meta["compared"] and {"rel_l2", "local_passed", "worst"} <= set(t.columns)
    f = run.first
    assert f.where == (0, 0, "blk.0.q") and f.kind == "local" and f.divergence is run.comparison.first
    assert "blk.0.q" in repr(f) and "prefill" in repr(f)
    ctx = f.context
    assert list(ctx["role"])[:2] == ["input", "first divergence"]
    assert list(ctx["site"])[:2] == ["blk.0.q_proj", "blk.0.q"]
    heads = f.heads
    assert list(heads["head"]) == [0, 1, 2, 3] and heads["rel_l2"].iloc[0] > 0.5
    assert run.diverged and run.verdict.startswith("DIVERGENCE") and run.steps() == [0, 1, 2]


def test_site_pair(run):
    p = run["blk.0.q", 0]
    assert p.dims == ("token", "head", "dim") and p.shape == tuple(run.ref[0, "blk.0.q"].shape)
    assert torch.equal(p.ours, run.ours[0, "blk.0.q"]) and torch.equal(p.ref, run.ref[0, "blk.0.q"])
    assert torch.equal(p.diff, p.ours - p.ref) and torch.equal(p.local_diff, p.local - p.ref)
    assert run[0, "blk.0.q"].site == "blk.0.q" and run["blk.0.q"].step == 0
    assert run["blk.1.kq", 2].dims == ("head", "token", "pos")
    assert p.stats(local=True).rel_l2 == pytest.approx(run.first.row["local_rel_l2"])
    hints = " ".join(p.hints())
    assert "equals its input blk.0.q_proj" in hints and "bias" in hints
    with pytest.raises(KeyError, match="steps with it"):
        run["blk.0.q", 7]
    with pytest.raises(SiteError):
        run["blk.0.nope", 0]
    assert "blk.0.q" in p._repr_html_() and "blk.0.q" in repr(p)


def test_worst_elements(run):
    w = run.worst("blk.0.q", k=4, step=0)
    assert len(w) == 4 and {"token", "token_id", "head", "dim", "index", "ours", "ref", "diff"} <= set(w.columns)
    assert list(w["abs_diff"]) == sorted(w["abs_diff"], reverse=True)
    row = run.first.row
    assert tuple(w["index"].iloc[0]) in {tuple(row["worst_index"])} | {(t, *row["worst_index"][1:]) for t in range(4)}
    top = w.iloc[0]
    p = run["blk.0.q", 0]
    assert top["ours"] == pytest.approx(float(p.ours[top["index"]]))
    assert top["diff"] == pytest.approx(top["ours"] - top["ref"])
    assert top["token_id"] == run.ref.step_tokens(0)[top["token"]]
    all_steps = run.worst("blk.0.q", k=10)
    assert set(all_steps["step"]) == {0, 1, 2}
    logits = run.worst("logits", k=3, step=1)
    assert list(logits.columns[:4]) == ["step", "site", "token", "token_id"] and "text" in logits


def test_comma_separated_site_globs(run):
    both = run.worst("blk.0.q,blk.0.k", k=50, step=0)             # one reading of site patterns everywhere
    assert set(both["site"]) == {"blk.0.q", "blk.0.k"}
    assert list(both["abs_diff"]) == sorted(both["abs_diff"], reverse=True)
    assert set(run.worst("blk.0.q, logits", k=1000, step=0)["site"]) == {"blk.0.q", "logits"}
    f = run.filter(layer=0, site="q,k", step=0)
    assert list(f["site"]) == ["blk.0.q", "blk.0.k"]
    assert list(run.filter(site=["q", "blk.0.k,blk.0.v"], step=0, layer=0)["site"]) == ["blk.0.q", "blk.0.k", "blk.0.v"]
    with pytest.raises(KeyError, match="no site matching"):
        run.worst("blk.0.nope,blk.0.nah")


def test_filter(run):
    f = run.filter(layer=0, site="q*", step=0)
    assert list(f["site"]) == ["blk.0.q_proj", "blk.0.q", "blk.0.q_rope"]
    assert isinstance(f, notebook.DiffTable)
    assert set(run.filter(site="blk.1.*", step=[1, 2])["layer"]) == {1}
    failed = run.filter(failed=True, step=0)
    assert set(failed["op"]) == {"q", "k", "v"} and (failed["local_passed"] == False).all()  # noqa: E712
    assert set(run.filter(family="softmax")["op"]) == {"attn_weights"}
    assert run.filter(layer=[1, 2], site="logits").empty
    html = f._repr_html_()
    assert 'id="first-row"' in html and "blk.0.q_rope" in html and "<script" not in html


def test_rich_displays(run):
    html = run._repr_html_()
    assert "DIVERGENCE" in html and 'data-site="blk.0.q"' in html and "<script" not in html
    assert "first divergence: blk.0.q at prefill" in repr(run)
    assert 'data-site="blk.0.q"' in run.first._repr_html_()
    assert run.table._repr_html_().count("<tr") <= notebook.DiffTable.max_rows + 10   # truncated


def test_inject_forms(tiny_f32):
    from harness.ours.inject import get_fault
    a = harness.drilldown(tiny_f32, tokens=[5, 17, 300], steps=0, inject=get_fault("q_register"), sites="blk.0.*")
    assert a.first.where == (0, 0, "blk.0.kq") and a.meta["faults"] == ["q_register"]
    with pytest.raises(ValueError, match="exactly one"):
        harness.drilldown(tiny_f32, steps=1)


def test_save_and_load_without_recomputing(run, tmp_path):
    path = run.save(tmp_path / "saved")
    back = notebook.load(path)
    assert isinstance(back.ref.tensors, LazyTensors)          # read on demand
    pd.testing.assert_frame_equal(back.comparison.table, run.comparison.table)
    assert back.first.where == run.first.where and back.first.explanation == run.first.explanation
    assert back.comparison.first_e2e == run.comparison.first_e2e
    assert torch.equal(back["blk.0.q", 1].local, run["blk.0.q", 1].local)
    assert back.worst("blk.0.q", k=2).equals(run.worst("blk.0.q", k=2))
    again = harness.drilldown(tiny_f32_path(run), ref=path, inject=["drop_qkv_bias"])   # llama.cpp not rerun
    assert again.first.where == run.first.where and again.ref.tensors.__class__ is LazyTensors


def tiny_f32_path(run):
    return run.gguf


def test_from_traces(run):
    again = notebook.from_traces(run.ours, run.ref, run.local, gguf=run.gguf)
    assert again.first.where == run.first.where
    pd.testing.assert_frame_equal(again.comparison.table, run.comparison.table)


def test_recorded_reference_run(run, tmp_path):
    from harness.runs.record import record
    rec = record(run.gguf, "tiny", prompt=PROMPT, steps=1, out_dir=tmp_path, sites="blk.0.*,logits")
    got = harness.drilldown(ref=rec.path, inject=["drop_qkv_bias"])         # the GGUF comes from the manifest
    assert isinstance(got.ref.tensors, LazyTensors)
    assert got.first.where == (0, 0, "blk.0.q") and got.tokens == rec.manifest["tokens"]
    assert set(got.sites()) == {n for _, n in got.ref.keys()} and "blk.1.q" not in got.sites()
    assert not harness.drilldown(run.gguf, ref=rec.path, local=False).diverged
    same = notebook.drilldown_recorded(rec.path, rec.path)
    assert not same.diverged and same.comparison.meta["compared"] == len(rec.manifest["tensors"])


@pytest.mark.slow
def test_drilldown_notebook_executes(tiny_f32, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    # the kernel: this interpreter's python3 kernelspec (jupyter_client runs "python" as sys.executable)
    monkeypatch.setenv("JUPYTER_PATH", os.path.join(sys.prefix, "share", "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("LLAMADIFF_FIXTURES", os.path.dirname(tiny_f32))   # the session's fixture, not a new one
    monkeypatch.setenv("LLAMADIFF_REPORTS", str(tmp_path / "reports"))
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()                                  # raises CellExecutionError on any failing cell

    def text(cell):
        out = []
        for o in cell.get("outputs", []):
            out.append(o.get("text", ""))
            out += [o.get("data", {}).get(k, "") for k in ("text/plain", "text/html")]
        return "\n".join(out)

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert text(code[-1]).split("KERNEL", 1)[1].strip() == sys.executable
    first = [c for c in code if "first-divergence" in c.metadata.get("tags", [])]
    assert len(first) == 1
    assert "first divergence: blk.0.q at prefill (layer 0, local error decides)" in text(first[0])
    everything = "\n".join(text(c) for c in code)
    assert 'data-site="blk.0.q"' in everything                       # run's rich display
    assert "ours equals its input blk.0.q_proj" in everything           # "looks like": the bias add is skipped
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 5
    assert not [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert (tmp_path / "reports" / "drilldown.html").is_file()
