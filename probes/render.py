"""Text for the fault zoo, the reference-free probes and the fault list: rich tables, markdown, JSON.

Pure functions of the plain data that ``probes.zoo`` / ``probes.checks`` / ``harness.ours.inject``
return; the ``llamadiff zoo|probe|faults`` commands print what these give back.
"""
from __future__ import annotations

import io
import json
import re

from rich.console import Console
from rich.table import Table

from harness.report.text import fmt_short, jsonable

from probes.zoo import ZooResult

_STATUS_STYLE = {"hit": "green", "clean": "green", "unscored": "yellow", "skipped": "dim", "miss": "bold red",
                 "false alarm": "bold red"}


def _table_text(title: str, columns: list[str], rows: list[list[str]], styles: list[str | None],
                head: list[str], foot: list[str], color: bool, width: int = 160) -> str:
    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=color, color_system="standard" if color else None)
    for line in head:
        con.print(line, highlight=False)
    tab = Table(title=title)
    for c in columns:
        tab.add_column(c, overflow="fold")
    for row, style in zip(rows, styles):
        tab.add_row(*row, style=style)
    con.print(tab)
    for line in foot:
        con.print(line, highlight=False)
    return buf.getvalue()


def _md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + \
        ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]


def _steps(n) -> str:
    return f"{n} decode step{'' if n == 1 else 's'}"


# -- zoo --------------------------------------------------------------------------------------
ZOO_COLUMNS = ["fault", "expected location", "found location", "result"]


def zoo_verdict(res: ZooResult) -> str:
    faults = [r for r in res.rows if r["status"] not in ("clean", "false alarm", "skipped")]
    skipped = [r["fault"] for r in res.rows if r["status"] == "skipped"]
    hits = sum(r["status"] == "hit" for r in faults)
    scored = sum(r["status"] in ("hit", "miss") for r in faults)
    clean = next((r for r in res.rows if r["status"] in ("clean", "false alarm")), None)
    parts = [f"{hits}/{scored} faults localized"]
    if clean is not None:
        parts.append("clean run: no divergence" if clean["status"] == "clean"
                     else f"clean run: FALSE ALARM at {clean['found']}")
    unscored = len(faults) - scored
    if unscored:
        parts.append(f"{unscored} unscored (no expected location)")
    if skipped:
        parts.append(f"{len(skipped)} skipped (not for {res.meta.get('architecture') or 'this architecture'})")
    return ("OK: " if res.ok else "FAILED: ") + ", ".join(parts)


def _zoo_head(res: ZooResult) -> list[str]:
    m = res.meta
    pol = m.get("policy") or {}
    arch = f"{m['architecture']}, " if m.get("architecture") else ""
    return [f"fault zoo on {m.get('gguf', '?')} ({arch}{m.get('weight_type', '?')}); tokens {len(m.get('tokens', []))} "
            f"(prompt {m.get('n_prompt')}), {_steps(m.get('steps'))}; tolerance regime "
            f"{pol.get('regime', '?')} (calibrated from {pol.get('calibrated_from')})"]


def _zoo_rows(res: ZooResult) -> list[list[str]]:
    return [[r["fault"], r["expected"], r["found"], r["status"]] for r in res.rows]


def _zoo_foot(res: ZooResult) -> list[str]:
    lines = [zoo_verdict(res)]
    for r in res.failures:
        lines.append(f"  {r['fault']}: expected {r['expected']}, found {r['found']}: {r['explanation']}")
    groups: dict[tuple, list[str]] = {}
    for r in res.rows:
        if r["status"] == "skipped":
            groups.setdefault((tuple(r.get("architectures") or ()), r.get("arch_note", "")), []).append(r["fault"])
    for (archs, note), names in groups.items():
        lines.append(f"  skipped, {', '.join(archs) or 'other'} only: {', '.join(names)}" + (f" ({note})" if note else ""))
    n = sum(r["status"] != "skipped" for r in res.rows)
    lines.append(f"({res.meta.get('total_seconds', 0):.1f} s: reference captured once in "
                 f"{res.meta.get('reference_seconds', 0):.1f} s, {n} comparisons)")
    return lines


def zoo_table(res: ZooResult, color: bool = False) -> str:
    return _table_text("fault zoo: where each injected fault is found", ZOO_COLUMNS, _zoo_rows(res),
                       [_STATUS_STYLE.get(r["status"]) for r in res.rows], _zoo_head(res), _zoo_foot(res), color)


def zoo_markdown(res: ZooResult) -> str:
    lines = ["# llamadiff fault zoo", ""] + [f"- {h}" for h in _zoo_head(res)] + [""]
    lines += _md_table(ZOO_COLUMNS, _zoo_rows(res)) + [""]
    lines += ["**" + _zoo_foot(res)[0] + "**"] + [f"- {x.strip()}" for x in _zoo_foot(res)[1:]]
    return "\n".join(lines) + "\n"


def zoo_json(res: ZooResult) -> str:
    return json.dumps(jsonable(dict(ok=res.ok, verdict=zoo_verdict(res), meta=res.meta, rows=res.rows)),
                      indent=1, allow_nan=False)


def render_zoo(res: ZooResult, fmt: str = "table", color: bool = False) -> str:
    return {"json": zoo_json, "markdown": zoo_markdown}.get(fmt, lambda r: zoo_table(r, color))(res)


# -- probes -----------------------------------------------------------------------------------
PROBE_COLUMNS = ["probe", "result", "failed", "worst at", "value", "threshold", "detail"]


def _probe_rows(summary: list[dict]) -> list[list[str]]:
    rows = []
    for s in summary:
        at = "-" if s["step"] is None else f"{s['site']} @ step {s['step']}"
        rows.append([s["name"], "FIRED" if s["fired"] else "ok", f"{s['failed']}/{s['total']}", at,
                     fmt_short(s["value"]), fmt_short(s["threshold"]), s["detail"]])
    return rows


def probe_verdict(summary: list[dict]) -> str:
    bad = [s["name"] for s in summary if s["fired"]]
    return f"FIRED: {', '.join(bad)}" if bad else "all probes quiet"


def _probe_head(meta: dict) -> list[str]:
    src = meta.get("source", "?")
    inj = f", faults injected: {', '.join(meta['faults'])}" if meta.get("faults") else ""
    return [f"reference-free probes on a {src} trace of {meta.get('gguf', '?')}: tokens {meta.get('n_tokens')} "
            f"(prompt {meta.get('n_prompt')}), {_steps(meta.get('steps'))}{inj}"]


def probe_table(summary: list[dict], meta: dict, color: bool = False) -> str:
    styles = ["bold red" if s["fired"] else "green" for s in summary]
    return _table_text("reference-free probes (worst record of each)", PROBE_COLUMNS, _probe_rows(summary), styles,
                       _probe_head(meta), [probe_verdict(summary)], color)


def probe_markdown(summary: list[dict], meta: dict) -> str:
    lines = ["# llamadiff probes", ""] + [f"- {h}" for h in _probe_head(meta)] + [""]
    lines += _md_table(PROBE_COLUMNS, _probe_rows(summary)) + ["", f"**{probe_verdict(summary)}**"]
    return "\n".join(lines) + "\n"


def probe_json(summary: list[dict], records: list[dict], meta: dict) -> str:
    return json.dumps(jsonable(dict(fired=[s["name"] for s in summary if s["fired"]], meta=meta, summary=summary,
                                     records=records)), indent=1, allow_nan=False)


def render_probes(summary: list[dict], records: list[dict], meta: dict, fmt: str = "table",
                  color: bool = False) -> str:
    if fmt == "json":
        return probe_json(summary, records, meta)
    if fmt == "markdown":
        return probe_markdown(summary, meta)
    return probe_table(summary, meta, color)


# -- fault list -------------------------------------------------------------------------------
FAULT_COLUMNS = ["fault", "architectures", "sites", "expected location", "models"]


def first_sentence(doc: str) -> str:
    """The docstring's first sentence, whitespace folded ("i.e. x" does not end a sentence)."""
    text = " ".join(doc.split())
    m = re.search(r"[.!?](?=\s+[A-Z(])", text)
    return text[:m.end()] if m else text


def fault_rows(faults) -> list[dict]:
    return [dict(name=f.name, architectures=list(f.architectures) if f.architectures is not None else None,
                 arch_note=f.arch_note, sites=f.patterns, expected=f.where_doc or "?", min_steps=f.min_steps,
                 min_prompt=f.min_prompt, summary=first_sentence(f.doc), doc=" ".join(f.doc.split()))
            for f in faults]


def _archs_cell(r: dict) -> str:
    return "all" if r["architectures"] is None else ", ".join(r["architectures"])


def _arch_notes(rows: list[dict]) -> list[str]:
    """One line per group of faults that exist only in some architectures, saying why."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["architectures"] is not None:
            groups.setdefault((_archs_cell(r), r["arch_note"]), []).append(r["name"])
    return [f"{archs} only: {', '.join(names)}" + (f": {note}" if note else "") + "; the zoo skips them elsewhere"
            for (archs, note), names in groups.items()]


def render_faults(faults, fmt: str = "table", color: bool = False) -> str:
    rows = fault_rows(faults)
    if fmt == "json":
        return json.dumps(rows, indent=1)
    cells = [[r["name"], _archs_cell(r), r["sites"], r["expected"], r["summary"]] for r in rows]
    notes = _arch_notes(rows)
    if fmt == "markdown":
        return "\n".join(["# llamadiff faults", ""] + _md_table(FAULT_COLUMNS, cells) + [""] +
                         [f"- {n}" for n in notes]) + "\n"
    return _table_text("registered faults (llamadiff zoo runs those of the model's architecture)", FAULT_COLUMNS,
                       cells, [None] * len(cells), [],
                       notes + ["user faults: --inject module:function@site-pattern (see harness/ours/inject.py)"],
                       color)
