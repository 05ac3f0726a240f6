"""A comparison as text: rich tables, markdown, JSON. Functions return strings; the CLI prints them."""
from __future__ import annotations

import io
import json
import math

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.compare.comparator import Comparison, decisive_column, group_of, layer_group, step_label
from harness.provenance import EXTRA_BUFTS_NOTE, summary_line


def fmt_short(x, nd=3) -> str:
    """A value for a text cell: ``nd`` significant digits, "-" for None/NaN, "inf" for an infinity."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.{nd}g}"
    return str(x)


def jsonable(x):
    """``x`` with only JSON types: NaN and NA -> None, an infinity -> its string, numpy/torch scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return None if math.isnan(x) else (str(x) if math.isinf(x) else x)
    if x is pd.NA or x is None:
        return None
    if hasattr(x, "item"):
        return jsonable(x.item())
    return x


def to_dict(cmp: Comparison) -> dict:
    """The complete, machine-readable form of a comparison."""
    first = None
    if cmp.first is not None:
        f = cmp.first
        first = dict(step=f.step, layer=f.layer, site=f.site, kind=f.kind, explanation=f.explanation,
                     row=f.row, inputs=f.inputs, also_failing_locally=f.also_failing_locally)
    return jsonable(dict(
        verdict="divergence" if cmp.diverged else "match", first_divergence=first,
        first_end_to_end_failure=cmp.first_e2e, meta=cmp.meta,
        table=cmp.table.to_dict("records"), logits=cmp.logit_rows.to_dict("records"),
        logit_spikes=cmp.spikes.to_dict("records")))


def to_json(cmp: Comparison) -> str:
    return json.dumps(to_dict(cmp), indent=1, allow_nan=False)


def layer_summary(cmp: Comparison) -> pd.DataFrame:
    """One row per layer (global sites under their own name): worst errors over steps and sites."""
    t = cmp.table
    if t.empty:
        return pd.DataFrame()
    rows = []
    for g, part in t.groupby(layer_group(t), sort=False):
        w = part.loc[part["rel_l2"].idxmax()]
        row = dict(layer=g, sites=len(part), failed=int((part["passed"] == False).sum()),  # noqa: E712
                   worst_rel=w["rel_l2"], worst_site=f"{w['op']}@{w['step']}")
        if decisive_column(part) == "local_passed":
            lw = part.loc[part["local_rel_l2"].astype(float).idxmax()]
            row.update(local_failed=int((part["local_passed"] == False).sum()),  # noqa: E712
                       worst_local_rel=lw["local_rel_l2"], worst_local_site=f"{lw['op']}@{lw['step']}")
        rows.append(row)
    return pd.DataFrame(rows)


def model_label(ours: dict) -> str:
    """The model's file type as llama.cpp names it and its tensor type mix
    ("Q4_K_M: Q5_0 132, F32 121, Q8_0 13, Q4_K 12, Q6_K 12"); the matrix type for older metas."""
    ft, mix = ours.get("file_type"), ours.get("type_mix") or {}
    mix_s = ", ".join(f"{t} {n}" for t, n in mix.items())
    if ft and mix_s:
        return f"{ft}: {mix_s}"
    return ft or (f"{ours.get('weight_type', '?')}: {mix_s}" if mix_s else ours.get("weight_type", "?"))


def regime_rows(policy: dict) -> list[dict]:
    """The tolerance regimes a comparison used, one dict each: regime, what it applies to, the
    weight types and site counts, where its values come from (a policy ``describe()``)."""
    rows = [dict(regime=policy.get("regime"), applies_to="every site end to end; locally, every op "
                 "but the weight matmuls" + ("" if policy.get("weight_regimes") else " (and those too)"),
                 types=policy.get("file_type") or "", sites=None, calibrated_from=policy.get("calibrated_from"))]
    for regime, w in (policy.get("weight_regimes") or {}).items():
        rows.append(dict(regime=regime, applies_to="local error of weight matmuls (matmul, logits) whose "
                         "weight has these types", types=", ".join(w.get("types") or {}), sites=w.get("sites"),
                         calibrated_from=w.get("calibrated_from")))
    return rows


def regime_lines(policy: dict) -> list[str]:
    """Header lines for the per-weight-type regimes (only when a file mixes classes, or its
    weight matmuls use another class than the file) and every fallback the policy took."""
    w = policy.get("weight_regimes") or {}
    lines = []
    if set(w) - {policy.get("regime")}:
        parts = [f"{r} for {t} ({n} site{'s' if n != 1 else ''})" for r, v in w.items()
                 for t, n in (v.get("types") or {}).items()]
        lines.append("per-weight-type tolerance regimes (local error of each weight matmul): " + ", ".join(parts))
    lines += [f"tolerance fallback: {f}" for f in policy.get("fallbacks") or []]
    return lines


def header_lines(cmp: Comparison) -> list[str]:
    """The report's header: model (file type and tensor type mix), both engines, tokens, tolerance
    regimes, provenance, warnings, faults."""
    m = cmp.meta
    ref, ours = m.get("ref", {}), m.get("ours", {})
    pol = m.get("policy") or {}
    lines = [f"model {ours.get('gguf', '?')} ({model_label(ours)}); reference "
             f"{ref.get('source', '?')} {ref.get('backend', '')} (KV {ref.get('kv_type', '?')}); "
             f"{'candidate' if m.get('local_basis') == 'candidate' else 'ours'} "
             f"{ours.get('source', '?')} {ours.get('device', '')} {ours.get('dtype', '')}",
             f"tokens {len(m.get('tokens', []))} (prompt {m.get('n_prompt')}): prefill + "
             f"{max(len(m.get('tokens', [])) - (m.get('n_prompt') or 0), 0)} decode steps, {m.get('compared')} site tensors compared; tolerance regime {pol.get('regime')}"
             f" (calibrated from {pol.get('calibrated_from')})"]
    if m.get("ubatch"):
        lines.append(f"prompt decoded in micro-batches of {m['ubatch']} tokens, each compared and freed "
                     f"before the next (statistics merged per step)")
    if m.get("end_to_end_sites"):
        u = m["end_to_end_sites"]
        lines.append(f"{len(u)} site(s) judged end to end only: llama.cpp's inputs to their ops were not captured "
                     f"({', '.join(u[:4])}{', ...' if len(u) > 4 else ''}); capture or record their inputs too for a local verdict")
    lines += regime_lines(pol)
    lines.append(summary_line(ref))
    if ref.get("extra_bufts") or (ref.get("provenance") or {}).get("extra_bufts"):
        lines.append(EXTRA_BUFTS_NOTE)
    for w in m.get("provenance_warnings", []):
        lines.append(f"warning: {w}")
    if m.get("faults"):
        lines.append(f"injected faults: {', '.join(m['faults'])}")
    if m.get("local_basis") == "candidate":
        lines.append(f"local error: each op of {ours.get('source', 'the engine')} recomputed with our PyTorch op on "
                     "its own inputs from the same trace; it decides the first divergence")
    for site, span in (m.get("local_spans") or {}).items():
        lines.append(f"local error at {site} spans {', '.join(span)} (the trace lacks the ops between)")
    if m.get("not_checkable"):
        lines.append(f"not checkable (the trace lacks them): {'; '.join(m['not_checkable'])}")
    if ref.get("unavailable"):
        lines.append(f"not available from the reference: {', '.join(ref['unavailable'])}")
    return lines


def verdict_line(cmp: Comparison) -> str:
    if cmp.first is None:
        return "no divergence: every compared op is within tolerance"
    return "DIVERGENCE: " + cmp.first.explanation


def first_lines(cmp: Comparison) -> list[str]:
    """The first divergence in a few lines: both errors, its inputs, drift and other failing ops."""
    f = cmp.first
    if f is None:
        return []
    r = f.row
    engine = cmp.meta.get("local_basis") == "candidate"     # `llamadiff check`: another engine's trace
    cand = "yours" if engine else "ours"
    out = [f"first divergence: {f.site} at {step_label(f.step)} ({f.kind} error decides)",
           f"  end to end: rel {fmt_short(r['rel_l2'])}, max |diff| {fmt_short(r['max_abs'])}, "
           f"cosine {fmt_short(r['cosine'], 6)}, worst {r['worst']}: {cand} {fmt_short(r['ours'], 5)}, "
           f"ref {fmt_short(r['ref'], 5)}"]
    if "local_rel_l2" in r and r.get("local_rel_l2") is not None and f.kind == "local":
        where, a, b = (("our op on your inputs", "expected", "yours") if engine
                       else ("on the reference's inputs", "ours", "ref"))
        out.append(f"  local ({where}): rel {fmt_short(r['local_rel_l2'])} (tolerance "
                   f"{fmt_short(r['local_tol_rel'])}), worst {r['local_worst']}: "
                   f"{a} {fmt_short(r['local_ours'], 5)}, {b} {fmt_short(r['local_ref'], 5)}")
    for i in f.inputs:
        state = "matches" if i["passed"] and i.get("local_passed") is not False else "differs"
        out.append(f"  input {i['site']}: {state} (rel {fmt_short(i['rel_l2'])}, "
                   f"local {fmt_short(i.get('local_rel_l2'))})")
    if cmp.first_e2e and cmp.first_e2e != (f.step, f.site):
        s, n = cmp.first_e2e
        out.append(f"  note: end-to-end error first exceeds tolerance at {n} ({step_label(s)}); that is drift "
                   f"from upstream, the op at fault is {f.site}")
    if f.also_failing_locally:
        more = ", ".join(f"{n}@{s}" for s, n in f.also_failing_locally[:6])
        how = "locally" if f.kind == "local" else "end to end"
        out.append(f"  {len(f.also_failing_locally)} more ops fail {how}: {more}"
                   f"{' ...' if len(f.also_failing_locally) > 6 else ''}")
    return out


def logit_lines(cmp: Comparison) -> list[str]:
    """The logit summary (top-1 agreement, top-10 overlap, KL) and the worst one-sided spikes."""
    lr = cmp.logit_rows
    if lr.empty:
        return []
    out = [f"logits: top-1 agreement {lr['top1_agree'].mean():.1%} of {len(lr)} token rows, mean top-10 "
           f"overlap {lr['topk_overlap'].mean():.2f}, max KL {fmt_short(float(lr['kl'].max()))}"]
    for s in cmp.spikes.head(5).to_dict("records"):
        out.append(f"  one-sided logit spike at step {s['step']} row {s['row']} token {s['token']}: "
                   f"ours {s['ours']:.4g}, ref {s['ref']:.4g} ({s['side']})")
    return out


def render_text_table(cmp: Comparison, width: int = 120, color: bool = False) -> str:
    """The rich report as text (ANSI colours when ``color``)."""
    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=color, color_system="standard" if color else None,
                  force_jupyter=False)   # in Jupyter, rich would display instead of writing to buf
    for line in header_lines(cmp):
        con.print(line, highlight=False)
    con.print(Text(verdict_line(cmp), style="bold red" if cmp.diverged else "bold green"))
    for line in first_lines(cmp):
        con.print(line, highlight=False)
    summary = layer_summary(cmp)
    if not summary.empty:
        tab = Table(title="per-layer summary (worst over steps and sites)")
        for col in summary.columns:
            tab.add_column(col, justify="right" if summary[col].dtype.kind in "if" else "left")
        first_layer = group_of(cmp.first.layer, cmp.first.site) if cmp.first is not None else None
        for rec in summary.to_dict("records"):
            style = "bold red" if rec["layer"] == first_layer else None
            tab.add_row(*[fmt_short(v) for v in rec.values()], style=style)
        con.print(tab)
    for line in logit_lines(cmp):
        con.print(line, highlight=False)
    return buf.getvalue()


def render_markdown(cmp: Comparison) -> str:
    lines = ["# llamadiff report", ""] + [f"- {h}" for h in header_lines(cmp)] + ["", f"**{verdict_line(cmp)}**", ""]
    if cmp.first is not None:
        lines += ["```"] + first_lines(cmp) + ["```", ""]
    summary = layer_summary(cmp)
    if not summary.empty:
        lines += ["| " + " | ".join(summary.columns) + " |", "|" + "---|" * len(summary.columns)]
        lines += ["| " + " | ".join(fmt_short(v) for v in rec.values()) + " |" for rec in summary.to_dict("records")]
        lines.append("")
    lines += logit_lines(cmp)
    return "\n".join(lines) + "\n"


def render(cmp: Comparison, fmt: str, color: bool = False) -> str:
    if fmt == "json":
        return to_json(cmp)
    if fmt == "markdown":
        return render_markdown(cmp)
    return render_text_table(cmp, color=color)
