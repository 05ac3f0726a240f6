"""harness.report.plots: every plot returns a Figure and writes a non-empty PNG of the requested size."""
import struct

import pytest
from matplotlib.figure import Figure

pytest.importorskip("llama_cpp")

from harness.report import plots  # noqa: E402
from harness.diff import DiffRequest, diff_gguf  # noqa: E402
from harness.ours.inject import get_fault  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which must come first."""
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def distinct_colors(data: bytes) -> int:
    import io

    from PIL import Image
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return len(im.getcolors(maxcolors=1 << 20) or [])


@pytest.fixture(scope="module")
def res(tiny_f32):
    return diff_gguf(DiffRequest(tiny_f32, prompt="The quick brown fox", steps=2,
                                 faults=[get_fault("drop_qkv_bias")]))


@pytest.fixture(scope="module")
def vocab(tiny_f32):
    from harness.gguf.load import read_tokens
    return read_tokens(tiny_f32)


PLOTS = {
    "layer_errors": (lambda r, v, **kw: plots.layer_errors(r, **kw), (12.0, 8.0)),
    "layer_errors_step": (lambda r, v, **kw: plots.layer_errors(r.comparison, step=1, **kw), (12.0, 8.0)),
    "step_errors": (lambda r, v, **kw: plots.step_errors(r, "blk.0.q", **kw), (9.0, 4.5)),
    "step_errors_glob": (lambda r, v, **kw: plots.step_errors(r, "blk.*.q", **kw), (9.0, 4.5)),
    "attention": (lambda r, v, **kw: plots.attention(r, 0, 1, step=0, **kw), (13.0, 4.2)),
    "attention_decode_local": (lambda r, v, **kw: plots.attention(r, 2, 3, step=2, local=True, **kw), (13.0, 4.2)),
    "attention_kq": (lambda r, v, **kw: plots.attention(r, 1, 0, step=1, site="kq", **kw), (13.0, 4.2)),
    "logits": (lambda r, v, **kw: plots.logits(r, step=2, vocab=v, **kw), (13.0, 5.0)),
    "error_hist": (lambda r, v, **kw: plots.error_hist(r, "blk.0.q", step=0, **kw), (9.0, 4.5)),
}


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_png_default_size(name, res, vocab, tmp_path):
    make, (w, h) = PLOTS[name]
    fig = make(res, vocab)
    assert isinstance(fig, Figure)
    out = fig.save(tmp_path / "sub" / f"{name}.png")          # one render per plot: they take a second
    with open(out, "rb") as f:
        data = f.read()
    assert png_size(data) == (round(w * 100), round(h * 100))
    assert len(data) > 10_000 and distinct_colors(data) > 20        # drawn, not a blank canvas


def test_plot_custom_size_and_jupyter_display(res, vocab):
    make, _ = PLOTS["step_errors"]
    fig = make(res, vocab, width=6.0, height=3.5, dpi=80)
    assert png_size(fig.png()) == (480, 280)
    assert png_size(fig.png(dpi=40)) == (240, 140)
    assert png_size(fig._repr_png_()) == (480, 280)                  # what Jupyter shows


def test_step_errors_takes_comma_separated_globs(res):
    fig = plots.step_errors(res, "blk.0.q, blk.1.k*")
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert {"blk.0.q local", "blk.1.k_proj local", "blk.1.k_rope end to end"} <= labels
    assert not any(label.startswith("blk.0.k") for label in labels)


@pytest.mark.parametrize("name", ["layer_errors", "attention"])
def test_plot_custom_size(name, res, vocab):
    make, _ = PLOTS[name]
    assert png_size(make(res, vocab, width=6.0, height=3.5, dpi=50).png()) == (300, 175)


def test_logit_outliers_are_labelled_with_token_text(res, vocab):
    import numpy as np
    fig = plots.logits(res, step=2, k=5, vocab=vocab)
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    o, r = res.ours[2, "logits"][-1].double(), res.ref[2, "logits"][-1].double()
    top = np.argsort(-(o - r).abs().numpy())[:5]
    for tok in top:
        assert any(lbl.startswith(f"{tok} ") and repr(vocab[tok].replace("$", r"\$")) in lbl for lbl in labels)


def test_layer_plot_marks_the_first_divergence(res):
    fig = plots.layer_errors(res)
    bias_ax = next(ax for ax in fig.axes if ax.get_title().startswith("bias"))
    stars = [ln for ln in bias_ax.lines if ln.get_marker() == "*"]
    assert stars and list(stars[0].get_xdata()) == [0]               # blk.0.q, layer 0
    legend = fig.axes[len([a for a in fig.axes if a.get_title()])].get_legend()
    assert any("blk.0.q" in t.get_text() for t in legend.get_texts())


def test_layer_plot_without_divergence(res):
    import dataclasses
    clean = dataclasses.replace(res.comparison, first=None)
    fig = plots.layer_errors(clean, width=6, height=4, dpi=50)
    assert png_size(fig.png()) == (300, 200)
    assert not [ln for ax in fig.axes for ln in ax.lines if ln.get_marker() == "*"]


def test_plot_errors(res):
    with pytest.raises(ValueError, match="not a per-head"):
        plots.attention(res, 0, 0, site="q")
    with pytest.raises(IndexError):
        plots.attention(res, 0, 99)
    with pytest.raises(KeyError, match="no site matching"):
        plots.step_errors(res, "blk.9.nothing")
    with pytest.raises(KeyError, match="no tensor"):
        plots.error_hist(res, "blk.0.q", step=7)
