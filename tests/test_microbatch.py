"""Micro-batched prefill (harness.stream): a prompt longer than the micro-batch, decoded by
llama.cpp in several batches and followed batch by batch by our model, gives the single-batch
path's table: the same rows, verdicts and first divergence; and the merged statistics of the
batches are those of the whole tensor."""
from dataclasses import replace

import pytest
import torch

from harness.compare.metrics import pair_stats, stats_vector
from harness.diff import DiffRequest, diff_gguf
from harness.ours.inject import Fault, get_fault
from harness.stream import Merger

PROMPT = [(i * 37) % 200 + 5 for i in range(40)]       # 40 tokens: 3 batches of 16, 16, 8


def _late_q_rope(x, ctx):
    """A bug only at positions >= 20 (the second batch) of layer 1's q_rope, prefill only."""
    if ctx.step or ctx.layer != 1:
        return None
    pos = torch.arange(ctx.pos, ctx.pos + x.shape[0])
    return torch.where((pos >= 20)[:, None, None], x * 1.05, x)


LATE = Fault("late_q_rope", [("blk.*.q_rope", _late_q_rope)])


@pytest.fixture(params=[None, True], ids=["per-pair", "batched"])
def batching(request, monkeypatch):
    """The lockstep's small pairs reduced one at a time (the CPU default) or per batch of pairs
    (the GPU default, forced here on the CPU)."""
    from harness.stream import Lockstep
    monkeypatch.setattr(Lockstep, "BATCH", request.param)
    return request.param


def _run(path, faults, ubatch, sites=None):
    req = DiffRequest(path, tokens=PROMPT, steps=2, faults=faults, ubatch=ubatch, isolate=False, sites=sites)
    return diff_gguf(req).comparison


def test_microbatched_site_subset_keeps_its_input_anchors(tiny_f32, llama_lib, batching):
    """``sites``: llama.cpp's blk.0.l_out is captured batch by batch as blk.1's anchor, so every
    op of the subset is judged locally, as in one batch, and a bug in the second batch is found."""
    for faults, where in (([], None), ([LATE], (0, 1, "blk.1.q_rope"))):
        one, many = _run(tiny_f32, faults, 0, "blk.1.*"), _run(tiny_f32, faults, 16, "blk.1.*")
        a, b = one.table, many.table
        assert list(zip(a.step, a.site)) == list(zip(b.step, b.site)) and set(b.layer) == {1}
        assert (a.local_passed == b.local_passed).all() and many.meta["end_to_end_sites"] == []
        assert [(f.step, f.layer, f.site) if f else None for f in (one.first, many.first)] == [where, where]


@pytest.mark.parametrize("fault, where", [(None, None), ("drop_qkv_bias", (0, 0, "blk.0.q")),
                                          ("decode_pos_off_by_one", (1, 0, "blk.0.q_rope")),
                                          (LATE, (0, 1, "blk.1.q_rope"))])
def test_microbatched_matches_single_batch(tiny_f32, llama_lib, fault, where, batching):
    faults = [] if fault is None else [fault if isinstance(fault, Fault) else get_fault(fault)]
    one, many = _run(tiny_f32, faults, 0), _run(tiny_f32, faults, 16)
    assert one.meta.get("ubatch") is None and many.meta["ubatch"] == 16
    a, b = one.table, many.table
    assert list(zip(a.step, a.site)) == list(zip(b.step, b.site)) and len(a) == 3 * 63
    assert (a.passed == b.passed).all() and (a.local_passed == b.local_passed).all()
    got = [(f.step, f.layer, f.site) if f else None for f in (one.first, many.first)]
    assert got == [where, where]
    assert list(many.logit_rows.row[many.logit_rows.step == 0]) == list(range(len(PROMPT)))
    same = a.site.str.match(r"^(embd|blk\.\d+\.(attn_norm|q_proj|q|k|v|k_proj|v_proj))$") & (a.step == 0)
    if fault is None:       # the first layer's inputs do not depend on the batching: equal statistics
        assert (a[same & (a.layer == 0)].rel_l2.values == pytest.approx(b[same & (b.layer == 0)].rel_l2.values,
                                                                       rel=1e-6, abs=1e-12))


def test_merged_stats_are_the_whole_tensors():
    """Row batches of a (T, D) pair and causal (H, T, P) slabs (zeros past each batch, as the
    softmax gives) merge into the whole pair's statistics, worst element included."""
    g = torch.Generator().manual_seed(0)
    T, D, H = 10, 6, 3
    a, b = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    a[7, 2] = 9.0
    wa = torch.rand(H, T, T, generator=g).tril()
    wb = torch.rand(H, T, T, generator=g).tril()
    wa[1, 8, 3] = 5.0
    m = Merger()
    for t0, t1 in ((0, 4), (4, 8), (8, 10)):
        m.add("e2e", 0, "embd", stats_vector(a[t0:t1], b[t0:t1]).tolist(), (t1 - t0, D), t0, (T, D))
        m.add("e2e", 0, "blk.0.attn_weights", stats_vector(wa[:, t0:t1, :t1], wb[:, t0:t1, :t1]).tolist(),
              (H, t1 - t0, t1), t0, (H, T, T))
    from harness.compare.metrics import finish_stats
    got = {site: finish_stats(vec, full) for _, _, site, full, vec in m.vectors()}
    for site, (x, y) in (("embd", (a, b)), ("blk.0.attn_weights", (wa, wb))):
        want, have = pair_stats(x, y), got[site]
        assert have.worst_index == want.worst_index
        for f in ("max_abs", "rel_l2", "cosine", "max_norm", "ours_value", "ref_value"):
            assert getattr(have, f) == pytest.approx(getattr(want, f), rel=1e-12), f
    assert got["embd"].worst_index == (7, 2) and got["blk.0.attn_weights"].worst_index == (1, 8, 3)


def test_runner_refuses_microbatches_into_a_plain_trace(tiny_f32, llama_lib):
    from harness.llama.runner import LlamaError, LlamaOptions, LlamaRunner
    with LlamaRunner(tiny_f32, LlamaOptions(device="cpu", ubatch=8, isolate=False), 64) as r:
        with pytest.raises(LlamaError, match="batch_done"):
            r.run(PROMPT, 1)


def test_microbatched_through_the_worker(tiny_f32, llama_lib):
    """The default, llama.cpp in its worker process: each batch's tensors and its marker come
    over the pipe in order; the first divergence is found where the single batch finds it."""
    req = DiffRequest(tiny_f32, tokens=PROMPT[:28], steps=1, faults=[LATE], ubatch=8)
    cmp = diff_gguf(req).comparison
    assert cmp.meta["ubatch"] == 8 and (cmp.first.step, cmp.first.layer, cmp.first.site) == (0, 1, "blk.1.q_rope")
    worst = cmp.first.row["local_worst"].split()          # "token 23 head 1 dim 5": a row of a later batch
    assert worst[0] == "token" and 20 <= int(worst[1]) < 28


@pytest.mark.parametrize("step", [0, 1])
def test_microbatched_systematic_statistics(synth_dir, llama_lib, step, batching):
    """The systematic statistics merge over the batches: a 1e-4 scale in one Q8_0 matmul, within
    every element's tolerance, is named at its exact site by both paths, and the clean sites'
    statistics and verdicts are the single-batch path's."""
    from harness.mde import perturb_fault
    from harness.synth import default_fixture
    path = default_fixture("q8_0", preset="tiny", seed=0, cache_dir=synth_dir)
    fault = perturb_fault("scale", 1e-4, "blk.1.ffn_up", step)
    one, many = _run(path, [fault], 0), _run(path, [fault], 16)
    assert many.meta["ubatch"] == 16
    for c in (one, many):
        assert (c.first.step, c.first.layer, c.first.site) == (step, 1, "blk.1.ffn_up")
        assert c.first.row["local_elem_passed"] and c.first.row["sys_stat"] == "slope"
        assert c.first.row["sys_slope"] == pytest.approx(1e-4, rel=0.05)
    a, b = one.table, many.table
    assert a.sys_passed.notna().sum() > 100
    assert list(a.sys_passed.fillna("na")) == list(b.sys_passed.fillna("na"))
    # layer 0's token-major sites see the same inputs in both paths: the same statistics
    same = (a.layer == 0) & a.site.str.match(r"^blk\.0\.(attn_norm|q_proj|q|k|v|ffn_up|ffn_gate)$")
    for col in ("sys_slope", "sys_z_slope", "sys_z_offset", "sys_z_chan"):
        assert list(b[same][col]) == pytest.approx(list(a[same][col]), rel=1e-6, abs=1e-9, nan_ok=True), col


@pytest.mark.parametrize("ubatch", [256, 512])
def test_last_token_logits_with_micro_batches_of_256(tiny_f32, llama_lib, ubatch):
    """Micro-batches output every row's logits; the batch's int8 ``logits`` flag once got the
    micro-batch size itself, 0 for 256 or 512 (llama.cpp then returned no logits at all)."""
    import numpy as np
    from harness.llama.runner import LlamaOptions, LlamaRunner
    prompt = [(i * 37) % 900 + 5 for i in range(600)]
    got = {}
    for u in (ubatch, None):
        with LlamaRunner(tiny_f32, LlamaOptions(device="cpu", ubatch=u, all_outputs=False, isolate=False),
                         len(prompt) + 2) as r:
            got[u] = r.logits_plain(prompt, 1)
    assert len(got[ubatch]) == 2
    for a, b in zip(got[ubatch], got[None]):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4)


def _spied_stream(path, isolate: bool):
    """A micro-batched report of PROMPT whose layer 0 (ours, end to end) notes the runner's stage
    when it runs, and the Lockstep that drove it."""
    from harness.diff import diff_stream
    from harness.llama.runner import LlamaOptions, LlamaRunner
    from harness.llama.worker import IsolatedRunner
    import harness.stream as st
    stage, seen, locks = [None], [], []

    def spy(x, ctx):
        seen.append((ctx.step, ctx.pos, stage[0]))
    opts = LlamaOptions(device="cpu", ubatch=16, isolate=isolate)
    runner = IsolatedRunner(path, opts, 64) if isolate else \
        LlamaRunner(path, opts, 64, on_stage=lambda what: stage.__setitem__(0, what))
    init = st.Lockstep.__init__

    def keep(self, *a, **k):
        init(self, *a, **k)
        locks.append(self)
    try:
        st.Lockstep.__init__ = keep
        req = DiffRequest(path, tokens=PROMPT, steps=1, ubatch=16, isolate=isolate, local=True,
                          faults=[Fault("spy", [("blk.0.l_out", spy)])])
        cmp = diff_stream(req, runner=runner).comparison
    finally:
        st.Lockstep.__init__ = init
        runner.close()
    return cmp, seen, locks[0]


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "worker"])
def test_prefill_batches_hold_one_layer_of_llama_cpps_tensors(tiny_f32, llama_lib, isolate):
    """Layer by layer: our stage runs once llama.cpp's tensors of it are in, and they are dropped
    then, so a prefill batch holds about one layer of them (19 sites + the next layer's first),
    not the batch's 63. In process, llama.cpp hands each node over inside llama_decode: our
    layer 0 runs while llama.cpp is still decoding the batch (before its "capture" stage)."""
    cmp, seen, lock = _spied_stream(tiny_f32, isolate)
    assert cmp.first is None and len(cmp.table) == 2 * 63
    assert lock.most_held == 20
    prefill = [s for s in seen if s[0] == 0]
    assert [p for _, p, _ in prefill] == [0, 0, 16, 16, 32, 32]        # end to end, then anchored
    if not isolate:
        assert {s for _, _, s in prefill} == {"decode step 0"}
        assert [s for st_, _, s in seen if st_ == 1] == ["capture step 1"] * 2   # a decode step: after it


def test_an_error_of_ours_inside_llama_decode_is_one_clear_error(tiny_f32, llama_lib):
    """Our model fails while llama.cpp's eval callback runs it (here a hook that says CUDA ran
    out of memory): one LlamaError (the command line's exit 2) that says where (our layer 1 runs
    when llama.cpp's layer 2 begins) and that the failure was in handing the tensor over, not in
    llama.cpp's capture; the runner recovers."""
    from harness.llama.runner import LlamaError, LlamaOptions, LlamaRunner

    def boom(x, ctx):
        if ctx.pos == 16:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    req = DiffRequest(tiny_f32, tokens=PROMPT, steps=1, ubatch=16, isolate=False,
                      faults=[Fault("boom", [("blk.1.ffn_up", boom)])])
    with LlamaRunner(tiny_f32, LlamaOptions(device="cpu", ubatch=16, isolate=False), 64) as r:
        from harness.diff import diff_stream
        with pytest.raises(LlamaError, match=r"^handing over llama.cpp's tensor failed at step 0 at node "
                                             r"'attn_norm-2 \(blk.2.attn_norm\)': RuntimeError: CUDA out of memory"):
            diff_stream(req, runner=r)
        assert diff_stream(replace(req, faults=[]), runner=r).comparison.first is None


def test_a_batch_unlike_the_one_ours_ran_is_one_clear_error(tiny_f32):
    """Ours starts a prefill batch before llama.cpp is done with it, from the prompt and the batch
    size; a batch that turns out different (another size) is a LlamaError (exit 2), not a table."""
    from harness.compare.comparator import Comparator
    from harness.compare.tolerance import Policy
    from harness.llama.runner import LlamaError
    from harness.ours.model import load_model
    from harness.stream import Lockstep
    model = load_model(tiny_f32)
    lock = Lockstep(model, Comparator(Policy("cpu", "F32")), None, [], True, lambda s: (40, 40),
                    prompt=PROMPT, ubatch=16)
    lock(0, "blk.0.attn_norm", torch.zeros(16, model.config.d_model))    # layer 0 begins: ours starts
    assert lock.started == (0, 0, PROMPT[:16])
    with pytest.raises(LlamaError, match="llama.cpp decoded 8 tokens at position 0 of step 0, ours ran 16"):
        lock.batch_done(0, 0, PROMPT[:8])
