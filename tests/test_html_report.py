"""harness.report.html / ``llamadiff report --format html``: one self-contained, escaped HTML file
whose first divergence is the JSON report's."""
import base64
import copy
import struct
from html.parser import HTMLParser

import pytest

pytest.importorskip("llama_cpp")

from harness.cli import main  # noqa: E402
from harness.report.html import render_html  # noqa: E402
from harness.diff import DiffRequest, diff_gguf  # noqa: E402
from harness.report.text import to_dict  # noqa: E402
from harness.ours.inject import get_fault  # noqa: E402

PROMPT = "The quick brown fox"


class Page(HTMLParser):
    """Every start tag with its attributes, the first-divergence section, and the full table's rows."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.first: dict | None = None
        self.rows: list[dict] = []
        self.style = ""
        self._in_style = False
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section" and a.get("id") == "first-divergence":
            self.first = a
        if tag == "style":
            self._in_style = True
        if tag == "tr":
            self._row = {"class": a.get("class", ""), "id": a.get("id"), "cells": []}
            self.rows.append(self._row)
        if tag == "td" and self._row is not None:
            self._row["cells"].append("")

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data
        elif self._row is not None and self._row["cells"]:
            self._row["cells"][-1] += data


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    p.close()
    return p


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def res(tiny_f32):
    return diff_gguf(DiffRequest(tiny_f32, prompt=PROMPT, steps=2, faults=[get_fault("drop_qkv_bias")]))


@pytest.fixture(scope="module")
def page_text(res):
    return render_html(res)


def test_single_self_contained_file(page_text):
    page = parse(page_text)
    assert page_text.startswith("<!DOCTYPE html>")
    tags = {t for t, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "base", "frame", "audio", "video", "source"}
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) >= 3                           # per-layer plot, steps and histogram, logits
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,")
        w, h = png_size(base64.b64decode(a["src"].split(",", 1)[1]))
        assert w >= 600 and h >= 300
    for t, a in page.tags:
        for k, v in a.items():
            if k in ("src", "href", "srcset", "action", "poster", "data", "background") and v:
                assert v.startswith(("data:image/png;base64,", "#")), f"<{t} {k}={v[:60]!r}> points outside"
    lowered = page_text.lower()
    assert 'src="http' not in lowered and "href=\"http" not in lowered and "//" not in page.style
    assert "url(" not in page.style and "@import" not in page.style and "@font-face" not in page.style


def test_first_divergence_matches_the_json_report(res, page_text):
    want = to_dict(res.comparison)["first_divergence"]
    assert want["site"] == "blk.0.q" and want["step"] == 0
    first = parse(page_text).first
    assert first["data-site"] == want["site"]
    assert int(first["data-step"]) == want["step"]
    assert first["data-layer"] == str(want["layer"])
    assert first["data-kind"] == want["kind"]


def test_full_table_has_every_row_and_marks_the_first(res, page_text):
    page = parse(page_text)
    table = res.comparison.table
    body = [r for r in page.rows if r["cells"] and r["class"] not in ("steprow", "rehead")
            and len(r["cells"]) >= 15]
    assert len(body) == len(table)
    assert [r["cells"][1] for r in body] == list(table["site"])
    first = [r for r in body if r["id"] == "first-row"]
    assert len(first) == 1 and first[0]["cells"][1] == "blk.0.q" and first[0]["class"] == "first"
    failing = {r["cells"][1] for r in body if r["class"] == "fail" and r["cells"][0] == "0"}
    assert {"blk.0.k", "blk.0.v"} <= failing
    steps = [r["cells"][0] for r in page.rows if r["class"] == "steprow"]
    assert len(steps) == table["step"].nunique()


def test_text_is_escaped(res):
    evil = copy.copy(res)
    cmp = copy.deepcopy(res.comparison)
    cmp.meta["faults"] = ['<script>alert("x")</script>']
    cmp.table.loc[cmp.table.index[3], "worst"] = "<img src=http://example.com/x.png>"
    evil.comparison = cmp
    text = render_html(evil, plots=False)
    assert "<script>" not in text and "<img src=http" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "&lt;img src=http://example.com/x.png&gt;" in text


def test_no_divergence(tiny_f32):
    res = diff_gguf(DiffRequest(tiny_f32, tokens=[5, 17, 300], steps=1))
    text = render_html(res, plots=False)        # plots without a divergence: tests/test_plots.py
    page = parse(text)
    assert page.first["data-site"] == "" and to_dict(res.comparison)["first_divergence"] is None
    assert 'class="verdict good"' in text and "first-row" not in text


def test_cli_writes_one_html_file(tiny_f32, tmp_path, capsys):
    out = tmp_path / "reports" / "x.html"
    rc = main(["report", tiny_f32, "--prompt", PROMPT, "--steps", "1", "--inject", "drop_qkv_bias",
               "--format", "html", "--out", str(out)])
    assert rc == 1                                   # divergence found
    assert [p.name for p in out.parent.iterdir()] == ["x.html"]   # no side files, no temp left
    text = out.read_text(encoding="utf-8")
    first = parse(text).first
    assert (first["data-site"], first["data-step"]) == ("blk.0.q", "0")
    assert "DIVERGENCE" in capsys.readouterr().out


def test_summary_shows_the_reference_provenance(res, page_text):
    from harness.provenance import summary_line
    line = summary_line(res.comparison.meta["ref"])
    assert "llama-cpp-python" in line and "extra buffer types off" in line and "KV f16" in line
    assert f'<p class="meta">{line}</p>' in page_text.replace("&#x27;", "'")
