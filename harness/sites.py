"""The one naming table: canonical hook sites, their layouts, and llama.cpp's graph names.

Every later part of llamadiff (the PyTorch model, the llama.cpp capture, the comparison, the
fault zoo) speaks these names. Site names live in one flat dotted namespace: global sites are
``embd``, ``output_norm`` and ``logits``; per-layer sites are ``blk.{i}.{key}``.

Layouts use symbolic dimensions, resolved per step:

=====  ============================================================
T      tokens processed in this step (prompt length at prefill, 1 at decode)
P      cached positions attended over (positions before this step + T)
D      hidden size (``embedding_length``)
F      feed-forward size (``feed_forward_length``)
H      query heads; ``Hkv`` key/value heads; ``Dh`` head size (``attention.key_length``, else D // H)
V      vocabulary size (rows of the output matrix)
=====  ============================================================

llama.cpp columns: ``llama_name`` is the graph name without the ``-{i}`` layer suffix and
``llama_op`` the ``ggml_op`` name that tells apart nodes sharing a name (``Qcur-0`` labels the
MUL_MAT, the bias ADD, a RESHAPE and the ROPE). ``attn_out`` has no name in llama.cpp's graph:
it is the MUL_MAT whose weight operand is ``blk.{i}.attn_output.weight`` (see :mod:`harness.llama.capture`).
"""
from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass


# What each layout dimension indexes, for naming elements ("token 3 head 1 dim 8") and columns.
DIM_NAMES = {"T": "token", "H": "head", "Hkv": "kv_head", "Dh": "dim", "P": "pos", "D": "dim", "F": "dim",
             "V": "vocab"}


@dataclass(frozen=True)
class SiteSpec:
    key: str                 # "q_rope"; full name "blk.3.q_rope" for per-layer sites
    per_layer: bool
    layout: tuple[str, ...]  # symbolic dims, e.g. ("T", "H", "Dh")
    family: str              # tolerance family (see harness.compare.tolerance)
    inputs: tuple[str, ...]  # upstream site keys this op reads (same layer unless global)
    llama_name: str | None
    llama_op: str | None
    doc: str


_S = SiteSpec
SITES: tuple[SiteSpec, ...] = (
    _S("embd", False, ("T", "D"), "embed", (), "embd", "GET_ROWS", "token embedding rows"),
    _S("attn_norm", True, ("T", "D"), "norm", ("@in",), "attn_norm", "MUL",
       "RMSNorm(x) * attn_norm.weight"),
    _S("q_proj", True, ("T", "H", "Dh"), "matmul", ("attn_norm",), "Qcur", "MUL_MAT",
       "x @ Wq^T, before the bias"),
    _S("q", True, ("T", "H", "Dh"), "bias", ("q_proj",), "Qcur", "ADD", "q_proj + bq"),
    _S("k_proj", True, ("T", "Hkv", "Dh"), "matmul", ("attn_norm",), "Kcur", "MUL_MAT",
       "x @ Wk^T, before the bias"),
    _S("k", True, ("T", "Hkv", "Dh"), "bias", ("k_proj",), "Kcur", "ADD", "k_proj + bk"),
    _S("v_proj", True, ("T", "Hkv", "Dh"), "matmul", ("attn_norm",), "Vcur", "MUL_MAT",
       "x @ Wv^T, before the bias"),
    _S("v", True, ("T", "Hkv", "Dh"), "bias", ("v_proj",), "Vcur", "ADD", "v_proj + bv"),
    _S("q_norm", True, ("T", "H", "Dh"), "norm", ("q_proj",), "Qcur_normed", "MUL",
       "RMSNorm of each query head over Dh * attn_q_norm.weight, before RoPE (qwen3)"),
    _S("k_norm", True, ("T", "Hkv", "Dh"), "norm", ("k_proj",), "Kcur_normed", "MUL",
       "RMSNorm of each key head over Dh * attn_k_norm.weight, before RoPE (qwen3)"),
    _S("q_rope", True, ("T", "H", "Dh"), "rope", ("q",), "Qcur", "ROPE",
       "RoPE (NEOX pairing: dim j with j + Dh/2) at the token positions"),
    _S("k_rope", True, ("T", "Hkv", "Dh"), "rope", ("k",), "Kcur", "ROPE", "RoPE of k"),
    _S("kq", True, ("H", "T", "P"), "scores", ("q_rope", "k_rope"), "kq", "MUL_MAT",
       "raw scores q . k over all cached positions, unscaled, no mask; query head h reads KV head h // (H/Hkv)"),
    _S("attn_weights", True, ("H", "T", "P"), "softmax", ("kq",), "kq_soft_max", "SOFT_MAX",
       "softmax(kq / sqrt(Dh) + causal mask)"),
    _S("kqv", True, ("T", "H", "Dh"), "attn", ("attn_weights", "v"), "kqv_out", None,
       "attention output per head: attn_weights @ V"),
    _S("attn_out", True, ("T", "D"), "matmul", ("kqv",), None, "MUL_MAT",
       "output projection kqv @ Wo^T (no name in llama.cpp)"),
    _S("ffn_inp", True, ("T", "D"), "residual", ("attn_out", "@in"), "ffn_inp", "ADD",
       "residual: layer input + attn_out"),
    _S("ffn_norm", True, ("T", "D"), "norm", ("ffn_inp",), "ffn_norm", "MUL",
       "RMSNorm(ffn_inp) * ffn_norm.weight"),
    _S("ffn_gate", True, ("T", "F"), "matmul", ("ffn_norm",), "ffn_gate", "MUL_MAT", "x @ Wgate^T"),
    _S("ffn_up", True, ("T", "F"), "matmul", ("ffn_norm",), "ffn_up", "MUL_MAT", "x @ Wup^T"),
    _S("ffn_act", True, ("T", "F"), "act", ("ffn_gate", "ffn_up"), "ffn_swiglu", None,
       "SwiGLU: silu(ffn_gate) * ffn_up"),
    _S("ffn_out", True, ("T", "D"), "matmul", ("ffn_act",), "ffn_out", "MUL_MAT", "ffn_act @ Wdown^T"),
    _S("l_out", True, ("T", "D"), "residual", ("ffn_inp", "ffn_out"), "l_out", "ADD",
       "layer output: ffn_inp + ffn_out"),
    _S("output_norm", False, ("T", "D"), "norm", ("@in",), "result_norm", "MUL",
       "RMSNorm(last l_out) * output_norm.weight"),
    _S("logits", False, ("T", "V"), "logits", ("output_norm",), "result_output", "MUL_MAT",
       "output_norm @ Wout^T (token_embd when the output matrix is tied)"),
)

BY_KEY: dict[str, SiteSpec] = {s.key: s for s in SITES}
# per-layer weight matmul sites -> the blk.{i} tensor they multiply by (logits: output.weight, or
# token_embd.weight when tied); the capture finds attn_out by it, the tolerance policy keys on its type
LAYER_WEIGHTS: dict[str, str] = {"q_proj": "attn_q.weight", "k_proj": "attn_k.weight", "v_proj": "attn_v.weight",
                                 "attn_out": "attn_output.weight", "ffn_gate": "ffn_gate.weight",
                                 "ffn_up": "ffn_up.weight", "ffn_out": "ffn_down.weight"}
LAYER_KEYS: tuple[str, ...] = tuple(s.key for s in SITES if s.per_layer)
_ORDER = {s.key: i for i, s in enumerate(SITES)}
_NAME_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)$")


class SiteError(ValueError):
    """A site name or pattern that does not exist."""


def site_name(key: str, layer: int | None = None) -> str:
    return f"blk.{layer}.{key}" if layer is not None else key


@functools.lru_cache(maxsize=None)
def parse_site(name: str) -> tuple[int | None, SiteSpec]:
    """``"blk.3.q_rope"`` -> ``(3, SPEC)``; ``"logits"`` -> ``(None, SPEC)``."""
    m = _NAME_RE.match(name)
    if m:
        spec = BY_KEY.get(m.group(2))
        if spec is not None and spec.per_layer:
            return int(m.group(1)), spec
    elif name in BY_KEY and not BY_KEY[name].per_layer:
        return None, BY_KEY[name]
    raise SiteError(f"unknown site {name!r} (expected e.g. 'embd', 'blk.0.q_rope', 'logits')")


def all_sites(n_layer: int, keys: tuple[str, ...] | None = None) -> list[str]:
    """Every site name in execution order; ``keys``: only these site keys (an architecture's,
    ``ArchSpec.sites``; default every key of the table)."""
    keep = set(keys) if keys is not None else set(BY_KEY)
    names = [k for k in ("embd",) if k in keep]
    for i in range(n_layer):
        names += [site_name(k, i) for k in LAYER_KEYS if k in keep]
    return names + [k for k in ("output_norm", "logits") if k in keep]


def order_key(name: str, n_layer: int) -> tuple[int, int]:
    """Sort key giving execution order within one step."""
    layer, spec = parse_site(name)
    if layer is None:
        layer = -1 if spec.key == "embd" else n_layer
    return layer, _ORDER[spec.key]


def input_sites(name: str, inputs: dict[str, tuple[str, ...]] | None = None,
                n_layer: int | None = None) -> list[str]:
    """Full names of the sites the op at ``name`` reads ("@in" is the layer's input);
    ``inputs``: an architecture's overrides of the table's ``inputs`` (``ArchSpec.inputs``);
    ``n_layer``: the model's layers, which name output_norm's input (the last layer's l_out)."""
    layer, spec = parse_site(name)
    out = []
    for key in (inputs or {}).get(spec.key, spec.inputs):
        if key == "@in":
            if layer is None:   # output_norm reads the last layer's l_out
                if n_layer:
                    out.append(site_name("l_out", n_layer - 1))
                continue
            out.append("embd" if layer == 0 else site_name("l_out", layer - 1))
        else:
            out.append(site_name(key, layer))
    return out


def shape_of(name: str, dims: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape of a site given the symbolic dims (T, P, D, F, H, Hkv, Dh, V)."""
    return tuple(dims[d] for d in parse_site(name)[1].layout)


def split_patterns(pattern: str) -> list[str]:
    """The globs of a comma-separated site pattern (``"blk.0.q, logits"`` -> two)."""
    return [p.strip() for p in pattern.split(",") if p.strip()]


def matches(name: str, pattern: str) -> bool:
    """Does the site ``name`` match any glob of the comma-separated ``pattern``?"""
    return any(fnmatch.fnmatchcase(name, p) for p in split_patterns(pattern))


def with_inputs(pattern: str, n_layer: int, keys: tuple[str, ...] | None = None,
                inputs: dict[str, tuple[str, ...]] | None = None) -> str:
    """``pattern`` and the input sites of every site it matches: what to capture so that each op of a subset runs on the reference's own
    inputs. ``keys``, ``inputs``: an architecture's (``ArchSpec.sites``, ``ArchSpec.inputs``)."""
    names = [n for n in all_sites(n_layer, keys) if matches(n, pattern)]
    wanted = set(names)
    extra = []
    for n in names:
        extra += [i for i in input_sites(n, inputs, n_layer) if i not in wanted and i not in extra]
    return ",".join([pattern, *extra])


@dataclass(frozen=True)
class SiteFilter:
    """Which (step, site) pairs to keep. Patterns are shell globs over site names
    (``blk.*.q_rope``, ``logits``), several separated by commas; None keeps all."""
    pattern: str | None = None
    layers: frozenset[int] | None = None
    steps: frozenset[int] | None = None

    def wants_site(self, name: str) -> bool:
        if self.pattern and not matches(name, self.pattern):
            return False
        if self.layers is not None:
            layer = parse_site(name)[0]
            if layer is not None and layer not in self.layers:
                return False
        return True

    def wants(self, step: int, name: str) -> bool:
        return (self.steps is None or step in self.steps) and self.wants_site(name)


def validate_pattern(pattern: str, n_layer: int, keys: tuple[str, ...] | None = None) -> None:
    """Raise SiteError when a site pattern matches no site at all (a typo); ``keys``: the
    architecture's sites (``ArchSpec.sites``), so that e.g. ``blk.*.q_norm`` is refused on qwen2."""
    names = all_sites(n_layer, keys)
    for p in split_patterns(pattern):
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise SiteError(f"site pattern {p!r} matches no site (e.g. 'blk.*.q', 'logits')")
