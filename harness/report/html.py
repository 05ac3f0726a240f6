"""``llamadiff report --format html``: one self-contained HTML file, plus the HTML pieces the
notebook API (:mod:`harness.notebook.run`) uses for its rich Jupyter display.

The file needs no network: plots are embedded as base64 PNG ``data:`` URIs, the CSS is inline,
there is no JavaScript and no external font, image or link. Every piece of text that comes from
the run (site names, fault names, token text, file names) goes through :func:`esc`.

The first divergence is also written as data attributes of ``<section id="first-divergence">``
(``data-site``, ``data-step``, ``data-layer``, ``data-kind``) so that tools (and the tests) can
read it back without scraping prose; it is the same as ``harness.report.text.to_dict(...)["first_divergence"]``.
"""
from __future__ import annotations

import base64
import html
import math
from typing import Iterable

import pandas as pd

from harness.compare.comparator import Comparison, group_of, step_label

# Every selector is scoped under .llamadiff so the notebook fragments do not restyle Jupyter.
CSS = """
.llamadiff { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px;
  color: #1d2330; line-height: 1.45; }
.llamadiff h1 { font-size: 22px; margin: 0 0 6px 0; }
.llamadiff h2 { font-size: 17px; margin: 26px 0 8px 0; padding-bottom: 3px; border-bottom: 1px solid #d8dce4; }
.llamadiff .meta { color: #4a5263; margin: 2px 0; font-size: 13px; }
.llamadiff .verdict { padding: 10px 14px; border-radius: 6px; margin: 12px 0; font-weight: 600; }
.llamadiff .verdict.bad { background: #fde8e8; border: 1px solid #e6a1a1; color: #8a1111; }
.llamadiff .verdict.good { background: #e6f6ea; border: 1px solid #98d3a6; color: #145c26; }
.llamadiff pre { background: #f5f6f8; border: 1px solid #e1e4ea; border-radius: 4px; padding: 8px 10px;
  font-size: 12.5px; overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
.llamadiff code, .llamadiff td.num, .llamadiff td.mono { font-family: Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.llamadiff .scroll { overflow: auto; width: fit-content; max-width: 100%; border: 1px solid #e1e4ea;
  border-radius: 4px; }
.llamadiff table.ld { border-collapse: collapse; font-size: 12px; }
.llamadiff table.ld th { position: sticky; top: 0; background: #eef0f4; text-align: left; padding: 4px 7px;
  border-bottom: 1px solid #c9ced8; white-space: nowrap; z-index: 1; }
.llamadiff table.ld td { padding: 2px 7px; border-bottom: 1px solid #eceef2; white-space: nowrap; }
.llamadiff table.ld td.num { text-align: right; }
.llamadiff table.ld td.wrap { white-space: normal; min-width: 8em; }
.llamadiff table.ld tr.rehead th { position: static; background: #f3f4f7; font-weight: 500; color: #4a5263; }
.llamadiff table.ld tr.fail td { background: #fdecec; }
.llamadiff table.ld tr.drift td { background: #fff7e0; }
.llamadiff table.ld tr.first td { background: #f8c9c9; font-weight: 600; }
.llamadiff table.ld tr.steprow td { background: #dfe6f2; font-weight: 600; }
.llamadiff table.ld td.bad { color: #b00020; font-weight: 600; }
.llamadiff table.ld td.ok { color: #1b7a35; }
.llamadiff .legend span { display: inline-block; padding: 1px 8px; margin-right: 8px; border: 1px solid #dde;
  font-size: 12px; }
.llamadiff .legend .fail { background: #fdecec; } .llamadiff .legend .drift { background: #fff7e0; }
.llamadiff .legend .first { background: #f8c9c9; }
.llamadiff figure { margin: 8px 0 16px 0; }
.llamadiff .row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.llamadiff .row figure { flex: 1 1 480px; max-width: 700px; margin: 0; }
.llamadiff figure img { max-width: 100%; height: auto; border: 1px solid #e1e4ea; }
.llamadiff figcaption { color: #4a5263; font-size: 12.5px; }
.llamadiff .more { color: #4a5263; font-size: 12px; padding: 4px 0; }
"""

# Columns of the full table in the HTML report, with their headers.
REPORT_COLUMNS = {
    "step": "step", "site": "site", "shape": "shape", "rel_l2": "rel L2", "max_abs": "max |diff|",
    "max_norm": "max/rms", "cosine": "cosine", "worst": "worst element", "ours": "ours", "ref": "ref",
    "tol_rel": "tol rel", "passed": "e2e", "local_rel_l2": "local rel L2", "local_max_norm": "local max/rms",
    "local_tol_rel": "local tol", "local_tol_regime": "local regime", "local_passed": "local",
    "local_worst": "local worst element",
}


def esc(x) -> str:
    """HTML-escape anything (quotes too: safe in attributes)."""
    return html.escape(str(x), quote=True)


def _missing(v) -> bool:
    if v is None or v is pd.NA:
        return True
    return isinstance(v, float) and math.isnan(v)


def fmt(v, digits: int = 4) -> str:
    """A table cell as plain (unescaped) text."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes, tuple)):
        v = v.item()                       # numpy / torch scalars
    if _missing(v):
        return "-"
    if isinstance(v, bool):
        return "ok" if v else "FAIL"
    if isinstance(v, float):
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.{digits}g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(str(x) for x in v) + ")"
    return str(v)


def _is_num(v) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, float)) or (hasattr(v, "dtype") and v.dtype.kind in "iuf")


def _flag(v) -> bool | None:
    return None if _missing(v) else bool(v)


def _row_class(rec: dict, first_key) -> str:
    local, e2e = _flag(rec.get("local_passed")), _flag(rec.get("passed"))
    decisive = local if local is not None else e2e
    cls = "fail" if decisive is False else ("drift" if e2e is False else "")   # drift: upstream error only
    if first_key is not None and (rec.get("step"), rec.get("site")) == first_key:
        cls = "first"
    return cls


def frame_html(df: pd.DataFrame, *, columns: dict[str, str] | Iterable[str] | None = None,
               max_rows: int | None = None, first: tuple[int, str] | None = None,
               step_rows: bool = False, index: bool = False, wrap: Iterable[str] = (),
               digits: int = 4) -> str:
    """A DataFrame as an escaped HTML table: failing rows tinted (``passed``/``local_passed``
    columns), the ``first`` (step, site) row highlighted, numbers right-aligned. ``columns``
    picks and renames columns (missing ones are skipped); ``step_rows`` inserts a banner row and
    the column headers again at each new step; ``wrap`` columns may wrap; ``max_rows`` truncates
    with a note."""
    if columns is None:
        cols = {c: str(c) for c in df.columns}
    elif isinstance(columns, dict):
        cols = {c: h for c, h in columns.items() if c in df.columns}
    else:
        cols = {c: str(c) for c in columns if c in df.columns}
    recs = df.to_dict("records")
    idx = list(df.index)
    shown = recs if max_rows is None else recs[:max_rows]
    heads = ("<th></th>" if index else "") + "".join(f"<th>{esc(h)}</th>" for h in cols.values())
    wrap = set(wrap)
    out = [f'<div class="scroll"><table class="ld"><thead><tr>{heads}</tr></thead><tbody>']
    last_step = object()
    for i, rec in enumerate(shown):
        if step_rows and "step" in rec and rec["step"] != last_step:
            last_step = rec["step"]
            label = step_label(int(last_step)) if not _missing(last_step) else "-"
            out.append(f'<tr class="steprow"><td colspan="{len(cols) + int(index)}">step {esc(fmt(last_step))}: '
                       f'{esc(label)}</td></tr>')
            if i:
                out.append(f'<tr class="rehead">{heads}</tr>')
        cls = _row_class(rec, first)
        rid = ' id="first-row"' if cls == "first" else ""
        out.append(f'<tr class="{cls}"{rid}>' if cls else "<tr>")
        if index:
            out.append(f'<td class="mono">{esc(fmt(idx[i]))}</td>')
        for c in cols:
            v = rec[c]
            tdc = "num" if _is_num(v) else ("mono" if isinstance(v, tuple) else ("wrap" if c in wrap else ""))
            if c in ("passed", "local_passed") and not _missing(v):
                tdc = "ok" if bool(v) else "bad"
            text = "\u00d7".join(map(str, v)) if c == "shape" and isinstance(v, tuple) else fmt(v, digits)
            out.append(f'<td class="{tdc}">{esc(text)}</td>' if tdc else f"<td>{esc(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    if max_rows is not None and len(recs) > max_rows:
        out.append(f'<div class="more">{len(recs) - max_rows} more rows not shown (of {len(recs)})</div>')
    return "".join(out)


def png_img(png: bytes, alt: str, caption: str | None = None) -> str:
    """A PNG embedded as a data URI (no file, no network)."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def verdict_html(cmp: Comparison) -> str:
    from harness.report.text import verdict_line
    return f'<div class="verdict {"bad" if cmp.diverged else "good"}">{esc(verdict_line(cmp))}</div>'


def first_html(cmp: Comparison) -> str:
    """The first divergence: a section whose data attributes name it, its report lines, its inputs."""
    from harness.report.text import first_lines
    f = cmp.first
    if f is None:
        return ('<section id="first-divergence" data-site="" data-step="" data-layer="" data-kind="">'
                "<p>No op exceeds its tolerance.</p></section>")
    layer = "" if f.layer is None else f.layer
    parts = [f'<section id="first-divergence" data-site="{esc(f.site)}" data-step="{esc(f.step)}" '
             f'data-layer="{esc(layer)}" data-kind="{esc(f.kind)}">',
             f"<p><b>{esc(f.site)}</b> at <b>{esc(step_label(f.step))}</b> ({esc(f.kind)} error decides)"
             f' &mdash; <a href="#first-row">its row in the table</a></p>',
             f"<pre>{esc(chr(10).join(first_lines(cmp)))}</pre>"]
    if f.inputs:
        parts.append(frame_html(pd.DataFrame(f.inputs), columns={
            "site": "input site", "rel_l2": "rel L2", "passed": "e2e", "local_rel_l2": "local rel L2",
            "local_passed": "local"}))
    parts.append("</section>")
    return "".join(parts)


def render_html(res, vocab: list[str] | None = None, title: str = "llamadiff report", plots: bool = True) -> str:
    """The whole report of a :class:`~harness.diff.DiffResult` (or a notebook ``Drilldown``) as one
    self-contained HTML document. ``vocab`` (``harness.gguf.load.read_tokens``) labels logit outliers with
    their text (a ``Drilldown`` brings its own); ``plots=False`` leaves the images out (faster)."""
    if vocab is None:
        vocab = getattr(res, "vocab", None)
    from harness.report import plots as plotting
    from harness.report.text import header_lines, logit_lines, layer_summary
    cmp: Comparison = res.comparison
    body = [f"<h1>{esc(title)}</h1>"]
    body += [f'<p class="meta">{esc(line)}</p>' for line in header_lines(cmp)]
    body.append(verdict_html(cmp))

    body.append("<h2>First divergence</h2>")
    body.append(first_html(cmp))

    if len(cmp.table) and plots:
        body.append("<h2>Error per layer</h2>")
        fig = plotting.layer_errors(res)
        body.append(png_img(fig.png(), "relative error per layer for each site family",
                            "Relative L2 error per layer for each site family (worst over sites and steps; log "
                            "scale). Solid: end to end; dashed: local (the op on the reference's inputs). Dotted "
                            "lines: tolerances. Red crosses: ops over tolerance."))
        fig.clear()
        if cmp.first is not None:
            f = cmp.first
            pair = []
            if cmp.table["step"].nunique() > 1:
                fig = plotting.step_errors(res, f.site)
                pair.append(png_img(fig.png(), f"error over decode steps at {f.site}",
                                    f"Relative error of {f.site} over the steps."))
                fig.clear()
            try:
                fig = plotting.error_hist(res, f.site, step=f.step)
            except KeyError:          # a trace without that tensor (e.g. a filtered recorded run)
                fig = None
            if fig is not None:
                pair.append(png_img(fig.png(), f"element errors at {f.site}",
                                    f"Element errors of {f.site} at {step_label(f.step)}, in units of the "
                                    "reference's RMS."))
                fig.clear()
            if pair:
                body.append(f"<h2>At the first divergence: {esc(f.site)}</h2>")
                body.append(f'<div class="row">{"".join(pair)}</div>')

    summary = layer_summary(cmp)
    if not summary.empty:
        body.append("<h2>Per-layer summary</h2>")
        first_layer = group_of(cmp.first.layer, cmp.first.site) if cmp.first is not None else None
        rows = frame_html(summary)
        if first_layer is not None:   # mark the layer of the first divergence
            rows = rows.replace(f"<tr><td>{esc(first_layer)}</td>",
                                f'<tr class="first"><td>{esc(first_layer)}</td>', 1)
        body.append(rows)

    logit = logit_lines(cmp)
    if logit:
        body.append("<h2>Logits</h2>")
        body.append(f"<pre>{esc(chr(10).join(logit))}</pre>")
        lr = cmp.logit_rows
        if len(lr) and "kl" in lr and plots:
            w = lr.loc[lr["kl"].astype(float).fillna(float("inf")).idxmax()]     # the worst token row
            try:
                fig = plotting.logits(res, step=int(w["step"]), row=int(w["row"]), vocab=vocab)
            except KeyError:
                fig = None
            if fig is not None:
                body.append(png_img(fig.png(), "logits, ours against the reference",
                                    f"Logits of the token row with the largest KL divergence (step {int(w['step'])}, "
                                    f"row {int(w['row'])}); the tokens that differ most are labelled."))
                fig.clear()

    pol = cmp.meta.get("policy") or {}
    if pol:
        from harness.report.text import regime_rows
        body.append("<h2>Tolerance regimes</h2>")
        body.append('<div id="tolerance-regimes">' + frame_html(pd.DataFrame(regime_rows(pol)), columns={
            "regime": "regime", "applies_to": "applies to", "types": "weight types", "sites": "sites",
            "calibrated_from": "calibrated from"}, wrap=("applies_to",)) + "</div>")

    body.append("<h2>Full table</h2>")
    body.append('<p class="legend"><span class="first">first divergence</span><span class="fail">over '
                'tolerance (decisive: local when measured)</span><span class="drift">end-to-end drift only'
                "</span></p>")
    first_key = (cmp.first.step, cmp.first.site) if cmp.first is not None else None
    body.append(frame_html(cmp.table, columns=REPORT_COLUMNS, first=first_key, step_rows=True,
                           wrap=("worst", "local_worst")))

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS} body {{ margin: 24px; max-width: 1500px; }}</style></head>"
            f"<body class=\"llamadiff\">{''.join(body)}</body></html>\n")
