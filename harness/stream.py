"""Micro-batched lockstep comparison: a long prompt in memory bounded by one layer of one batch.

llama.cpp decodes the prompt ``ubatch`` tokens at a time (:attr:`LlamaOptions.ubatch`, one
``llama_decode`` per batch, then each decode step). Its captured tensors reach :class:`Lockstep`
(a runner sink with ``batch_done``) in execution order; our model follows stage by stage
(:meth:`~harness.ours.model.Model.stages`: the embedding, each block, the output), at the same
positions, on its own KV cache (end to end) and on a second cache with every site anchored to
llama.cpp's value (the local errors), as soon as llama.cpp's tensors of the stage are in. In
process the runner hands each node over inside its eval callback (``Lockstep.streams``), so a
layer of ours runs while llama.cpp is at the next one. Each pair is reduced to a
:func:`~harness.compare.metrics.stats_vector` (on a GPU, pairs under ``Comparator.LARGE``
elements together, per segment), and llama.cpp's tensors of a stage are dropped once our stage
has run.

A table row is still one (step, site) over the whole step: :class:`Merger` combines the
batches' vectors the way the reductions compose (sums of squares for the three norms, sums
for the dot product and the non-finite count, the max for the worst element with its index
moved to the whole step's coordinates; on a tie the smallest index, as ``argmax`` picks), and
:meth:`Comparator.add_reduced` turns the merged vector into the row, with the same metrics,
tolerances and verdicts as the single-batch path. Attention-score sites ``kq``/``attn_weights``
(H, T, P) come per batch as (H, T_batch, P_batch): positions after the batch do not exist yet.
``attn_weights`` there is 0 on both sides in the single-batch path too (causal mask), so its
statistics are the same; ``kq`` (raw scores, no mask) loses the non-causal scores of later
positions, which nothing downstream reads: its statistics cover the causal part (plus each
batch's own upper triangle). Logit rows (top-1, top-k, KL) are per token row, so exact.
The systematic-error statistics of the local pairs (:mod:`harness.compare.systematic`) merge
the same way: each batch's :func:`~harness.compare.systematic.sys_sums` (sums and per-channel
sums over its rows) add up to the whole step's, so a micro-batched verdict tests them as the
single-batch path does (exactly for token-major sites; over each batch's own slab for the
attention-score sites, as above).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import harness.compare.systematic as sysmod
from harness.compare.comparator import Comparator
from harness.compare.metrics import batch_stats, logit_stats, optimistic_stats, stats_vector
from harness.sites import SiteFilter, parse_site
from harness.trace import Trace


class Merger:
    """Per (kind, step, site): the batches' stats vectors combined into one over the step."""

    def __init__(self):
        self.acc: dict[tuple[str, int, str], list] = {}     # -> [vector (list of 9), full shape]
        self.sys: dict[tuple[int, str], list] = {}          # local pairs: [sums (6), channel sums]

    def add_sys(self, step: int, site: str, sums: torch.Tensor, chan: torch.Tensor | None) -> None:
        """A batch's :func:`~harness.compare.systematic.sys_sums` of the local pair at (step, site)."""
        old = self.sys.get((step, site))
        if old is None:
            self.sys[(step, site)] = [sums.clone(), None if chan is None else chan.clone()]
            return
        old[0] += sums
        if old[1] is not None and chan is not None:
            old[1] += chan

    def systematic(self):
        """(step, site, the six systematic columns) of every local pair with merged sums."""
        keys = list(self.sys)
        cols = sysmod.sys_finish_many([self.sys[k][0] for k in keys], [self.sys[k][1] for k in keys])
        for (step, site), c in zip(keys, cols):
            yield step, site, c

    def add(self, kind: str, step: int, site: str, vec: list[float], piece: tuple, t0: int, full: tuple) -> None:
        """``vec`` of a batch whose tensor has shape ``piece`` and starts at row ``t0`` of the
        step's T axis; ``full``: the step's shape."""
        flat = _global_index(int(vec[0]), piece, full, parse_site(site)[1].layout.index("T"), t0)
        v = [float(flat), vec[1], vec[2] ** 2, vec[3] ** 2, vec[4] ** 2, vec[5], vec[6], vec[7], vec[8]]
        key = (kind, step, site)
        old = self.acc.get(key)
        if old is None:
            self.acc[key] = [v, full]
            return
        a = old[0]
        if v[1] > a[1] or (v[1] == a[1] and v[0] < a[0]) or (math.isnan(v[1]) and not math.isnan(a[1])):
            a[0], a[1], a[7], a[8] = v[0], v[1], v[7], v[8]
        for i in (2, 3, 4, 5, 6):
            a[i] += v[i]

    def vectors(self):
        """(kind, step, site, full shape, merged stats vector) of every pair."""
        for (kind, step, site), (a, full) in self.acc.items():
            yield kind, step, site, full, [a[0], a[1], a[2] ** 0.5, a[3] ** 0.5, a[4] ** 0.5, a[5], a[6], a[7], a[8]]


def _to_host(items: list) -> list:
    """[(sums, channel sums or None) or None] on a device -> the same on the host, in one transfer."""
    parts = [t for it in items if it is not None for t in it if t is not None]
    if not parts:
        return list(items)
    flat = torch.cat([t.reshape(-1) for t in parts]).cpu()
    out, at = [], 0
    for it in items:
        if it is None:
            out.append(None)
            continue
        pair = []
        for t in it:
            if t is None:
                pair.append(None)
            else:
                pair.append(flat[at:at + t.numel()].reshape(t.shape))
                at += t.numel()
        out.append(tuple(pair))
    return out


def _stage(site: str, n_stages: int) -> int:
    """Stage of a site in :meth:`~harness.ours.model.Model.stages`: embd 0, layer i's i + 1, the
    output's last."""
    layer, spec = parse_site(site)
    if layer is not None:
        return layer + 1
    return 0 if spec.key == "embd" else n_stages - 1


def _global_index(flat: int, piece: tuple, full: tuple, t_axis: int, t0: int) -> int:
    """A flat index in a batch's tensor, as a flat index in the step's tensor."""
    idx = []
    for s in reversed(piece):
        idx.append(flat % s if s else 0)
        flat = flat // s if s else 0
    idx = list(reversed(idx))
    idx[t_axis] += t0
    out = 0
    for i, s in zip(idx, full):
        out = out * s + i
    return out


@dataclass
class _Pending:
    """A compared pair awaiting the batch's transfer: ``tm`` whether its systematic sums are
    wanted (None: no; else whether the site is token-major); ``small``: reduced with the batch
    (``stats``/``sums`` filled then, exactly), else reduced at once, finiteness unchecked."""
    kind: str
    step: int
    name: str
    t0: int
    x: torch.Tensor
    ref: torch.Tensor
    tm: bool | None
    small: bool
    stats: torch.Tensor | None
    sums: tuple | None


class Lockstep:
    """Runner sink that drives our model one llama.cpp batch at a time and compares as it goes.

    ``step_shape(step)`` -> (T, P) of the whole step (for the merged rows' shapes). Our tensors
    wait, reduced but not yet checked for non-finite values, until ``HOLD`` bytes of them are
    pending (one host synchronisation per batch of pairs, not one per pair).

    Layer by layer: our model runs as stages (:meth:`~harness.ours.model.Model.stages`: the
    embedding, each block, the output). A stage of ours runs, end to end and anchored, once
    llama.cpp's tensors of that stage are all in, i.e. when the first tensor of a later stage
    arrives; llama.cpp's tensors of the stage are then dropped. With ``prompt`` and ``ubatch``
    given, a prefill batch's tokens are known before llama.cpp decodes it, and a runner that
    hands each node over as it is computed (``streams``: inside its eval callback) keeps about
    one layer of llama.cpp's tensors at a time, not the batch's. A decode step (its token may
    be llama.cpp's own choice) runs when its batch is done."""
    HOLD = 1 << 30
    STAGE_HOLD = 1 << 28        # pending bytes that make a stage's end reduce (frees its pairs)
    BATCH: bool | None = None   # pairs under Comparator.LARGE elements reduced per batch: None on a GPU
                                # only, True everywhere (tests), False never (one pair at a time)
    streams = True              # runner: hand each node over as it is computed

    def __init__(self, model, comp: Comparator, filt: SiteFilter | None, hooks, local: bool, step_shape,
                 progress=None, prompt: list[int] | None = None, ubatch: int | None = None):
        self.model, self.comp, self.filt, self.hooks = model, comp, filt, list(hooks)
        self.step_shape, self.progress = step_shape, progress      # progress(tokens compared so far)
        self.prompt, self.ubatch, self.next_pos = prompt, ubatch, 0
        self.batch: dict[str, torch.Tensor] = {}
        self.caches = {"e2e": model.new_cache(), "local": model.new_cache() if local else None}
        self.runs: dict | None = None       # the batch's stage generators, once started
        self.started: tuple | None = None   # (step, pos0, tokens) of the batch ours runs
        self.done = -1                      # the batch's last stage run on our side
        self.n_stages = model.config.n_layer + 2
        self.merger = Merger()
        self.captured: dict[tuple[int, str], None] = {}     # every (step, site) llama.cpp gave, in order
        self.broken: set[tuple[str, int, str]] = set()
        self.pending: list = []
        self.pending_bytes = 0
        self.most_held = 0                  # the most llama.cpp tensors of a prefill batch held at once

    def __call__(self, step: int, site: str, x: torch.Tensor) -> None:     # llama.cpp's tensors
        stage = _stage(site, self.n_stages)
        if stage > self.done + 1 and self._known(step):
            self._advance(stage - 1)        # llama.cpp is past those stages: run them, drop them
        self.batch[site] = x
        self.captured[(step, site)] = None        # compared or held as an anchor (a --sites input)
        if step == 0:
            self.most_held = max(self.most_held, len(self.batch))

    def _known(self, step: int) -> bool:
        """Are this batch's tokens known before llama.cpp is done with it (a prefill batch)?"""
        if self.runs is not None:
            return True
        if step != 0 or self.prompt is None or not self.ubatch:
            return False
        pos0 = self.next_pos
        self._start(step, pos0, self.prompt[pos0:pos0 + self.ubatch])
        return True

    def _start(self, step: int, pos0: int, tokens: list[int]) -> None:
        """The batch's stage generators, end to end and anchored, each with its recorder."""
        m = self.model
        ids = torch.tensor(tokens, device=m.device)
        t0 = pos0 if step == 0 else 0                   # the batch's first row within its step
        self.runs, self.done = {}, -1
        self.started = (step, pos0, list(tokens))
        for kind, cache in self.caches.items():
            if cache is not None:
                anchor = (lambda s, name: self.batch.get(name)) if kind == "local" else None
                self.runs[kind] = (m.stages(ids, pos0, cache), self._recorder(kind, step, t0), anchor)
        m.manager.step, m.manager.pos = step, pos0

    @torch.no_grad()
    def _advance(self, upto: int) -> None:
        """Run our stages up to ``upto`` (both passes), then drop llama.cpp's tensors of them."""
        m = self.model
        while self.done < upto:
            self.done += 1
            for gen, rec, anchor in self.runs.values():
                with m.hooks(self.hooks, recorder=rec, anchor=anchor):
                    next(gen)
            for name in [n for n in self.batch if _stage(n, self.n_stages) <= self.done]:
                del self.batch[name]
            if self.pending_bytes >= self.STAGE_HOLD:
                self._reduce()

    def batch_done(self, step: int, pos0: int, tokens: list[int]) -> None:
        """llama.cpp finished a batch: ours runs the stages left (all of them for a decode step),
        then the batch's pairs are reduced and its tensors dropped."""
        if self.runs is None:
            self._start(step, pos0, tokens)
        elif self.started != (step, pos0, list(tokens)):
            from harness.llama.runner import LlamaError
            raise LlamaError(f"llama.cpp decoded {len(tokens)} tokens at position {pos0} of step {step}, "
                             f"ours ran {len(self.started[2])} at {self.started[1]} of step {self.started[0]}")
        self._advance(self.n_stages - 1)
        self.runs, self.done = None, -1
        self._reduce()
        self.batch = {}
        if step == 0:
            self.next_pos = pos0 + len(tokens)
        if self.progress is not None:
            self.progress(pos0 + len(tokens))

    def _recorder(self, kind: str, step: int, t0: int):
        def rec(s, name, x):
            ref = self.batch.get(name)
            if ref is None or (self.filt is not None and not self.filt.wants(s, name)):
                return
            x = x.detach().float()
            if (kind, step, name) in self.broken:
                return
            if x.shape != ref.shape:
                self.broken.add((kind, step, name))         # a mismatch is a failing row, as a whole
                (self.comp.add if kind == "e2e" else self.comp.add_local)(step, name, x, ref)
                return
            if name == "logits" and kind == "e2e":
                self._logit_rows(step, t0, x, ref)
            tm = None             # the systematic sums wanted: is the site token-major?
            if kind == "local" and self.comp.wants_systematic(name, math.prod(self._full(step, name, ref.shape))):
                tm = parse_site(name)[1].layout[0] == "T"
            batch = self.BATCH if self.BATCH is not None else x.is_cuda
            small = batch and x.numel() < Comparator.LARGE
            stats = None if small else optimistic_stats(x, ref)             # small: with the batch
            sums = None if small or tm is None else sysmod.sys_sums(x, ref, tm)
            self.pending.append(_Pending(kind, step, name, t0, x, ref, tm, small, stats, sums))
            self.pending_bytes += x.numel() * 4
            if self.pending_bytes >= self.HOLD or not (x.is_cuda or batch):
                self._reduce()
        return rec

    def _logit_rows(self, step: int, t0: int, x, ref) -> None:
        rows, spikes = logit_stats(x, ref)
        self.comp.logit_rows += [dict(r, step=step, row=r["row"] + t0) for r in rows]
        self.comp.spikes += [dict(sp, step=step, row=sp["row"] + t0) for sp in spikes]

    def _reduce(self) -> None:
        """The batch's stats to the host in one transfer (pairs with a non-finite value again on
        the masked path), merged; then every tensor of the batch can go."""
        if not self.pending:
            return
        self._reduce_small()
        vals = torch.stack([p.stats for p in self.pending]).cpu()
        sys_host = _to_host([p.sums for p in self.pending])
        for p, v, sums in zip(self.pending, vals, sys_host):
            if not p.small and not bool(torch.isfinite(v[2:5]).all()):     # small: already exact
                v = stats_vector(p.x, p.ref).cpu()
            full = self._full(p.step, p.name, p.ref.shape)
            self.merger.add(p.kind, p.step, p.name, v.tolist(), tuple(p.ref.shape), p.t0, full)
            if sums is not None:
                self.merger.add_sys(p.step, p.name, *sums)
        self.pending, self.pending_bytes = [], 0

    def _reduce_small(self) -> None:
        """The pending small pairs' stats (exact also for non-finite values: the masked path) and
        systematic sums, reduced per segment in a few kernels; the pending entries get them."""
        small = [p for p in self.pending if p.small]
        if not small:
            return
        stats = batch_stats([p.x for p in small], [p.ref for p in small])
        for p, st in zip(small, stats):
            p.stats = st
        want = [p for p in small if p.tm is not None]
        if want:
            sums, chan, counts = sysmod.sys_sums_many([p.x for p in want], [p.ref for p in want], [p.tm for p in want])
            at = 0
            for p, s, c in zip(want, sums, counts):
                p.sums = (s, chan[at:at + c] if c else None)
                at += c

    def _full(self, step: int, name: str, piece) -> tuple:
        """The whole step's shape of a batch's tensor of shape ``piece`` at ``name``."""
        T, P = self.step_shape(step)
        return tuple({"T": T, "P": P}.get(d, n) for d, n in zip(parse_site(name)[1].layout, piece))

    def finish(self, ours_meta: dict, ref_meta: dict, tokens: list[int], n_prompt: int, n_layer: int):
        """The Comparison (rows in execution order) once llama.cpp's run has returned."""
        for kind, step, site, full, vec in self.merger.vectors():
            if (kind, step, site) not in self.broken:
                self.comp.add_reduced(kind, step, site, full, vec)
        for step, site, cols in self.merger.systematic():
            if ("local", step, site) not in self.broken:
                self.comp.add_systematic(step, site, cols)
        order = Trace(n_layer, tokens=list(tokens), n_prompt=n_prompt, meta=dict(ref_meta),
                      tensors=dict(self.captured))    # the rows' order, and which inputs existed
        return self.comp.result(ours_meta, order)
