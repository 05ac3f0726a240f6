"""MDE measurement (harness.mde): the perturbations, the bisection, and one real search."""
import math

import pandas as pd
import pytest
import torch

from harness import mde


def test_perturbations_have_the_stated_shape():
    x = torch.linspace(-4, 4, 801)
    rms = x.pow(2).mean().sqrt()
    assert torch.allclose(mde.perturbation("scale", 0.01)(x), x * 1.01)
    assert torch.allclose(mde.perturbation("shift", 0.01)(x) - x, torch.full_like(x, 0.01 * rms))
    y = mde.perturbation("squash", 0.1)(x)
    assert bool((y[1:] > y[:-1]).all())                                   # monotonic
    assert bool((y.abs() <= x.abs() + 1e-7).all())                         # never grows a value
    rel = ((x - y).abs() / x.abs().clamp_min(1e-9))
    assert rel[x.abs() > 1.5 * rms].min() > rel[(x.abs() > 0) & (x.abs() < 0.2 * rms)].max()  # large shrink most
    assert float(rel.max()) <= 0.1 + 1e-6
    masked = torch.tensor([1.0, float("-inf"), 2.0])
    assert torch.isinf(mde.perturbation("squash", 0.5)(masked)[1])
    with pytest.raises(ValueError):
        mde.perturbation("nope", 0.1)


class _Threshold(mde.Search):
    """A Search whose verdicts are a step function of e (no model)."""
    def __init__(self, before, after):
        super().__init__(None, None, "blk.1.q", "scale")
        self.cut = dict(before=before, after=after)

    def localized(self, e, mode):
        self.evals[e] = True
        return e >= self.cut[mode]


def test_bisection_brackets_the_threshold_to_its_resolution():
    s = _Threshold(3e-3, 2e-6)
    b, a = s.mde("before"), s.mde("after")
    step = (mde.E_HI / mde.E_LO) ** (1 / 2 ** mde.ITERS)
    assert 3e-3 <= b <= 3e-3 * step and 2e-6 <= a <= 2e-6 * step
    assert _Threshold(2.0, 2.0).mde("before") == math.inf
    assert _Threshold(0.0, 0.0).mde("after") == mde.E_LO
    assert mde.fmt(math.inf) == ">1" and mde.fmt(mde.E_LO) == "<=1e-07" and mde.fmt(0.00123) == "0.0012"


def test_fails_before_reads_execution_order():
    t = pd.DataFrame(dict(step=[0, 0, 0, 1], site=["embd", "blk.0.q", "blk.0.k", "embd"],
                          local_passed=[True, False, True, False]))
    assert not mde.fails_before(t, 0, "blk.0.q", "local_passed")
    assert mde.fails_before(t, 0, "blk.0.k", "local_passed")
    assert mde.first_failure(t, "local_passed") == (0, "blk.0.q")
    assert mde.target_site("matmul", 3) == "blk.1.ffn_up" and mde.target_site("logits", 3) == "logits"


def test_summary_takes_the_worst_seed():
    rows = [dict(regime="r", family="matmul", site="s", kind="scale", before=b, after=a)
            for b, a in ((1e-2, 1e-5), (2e-2, 3e-6))]
    (s,) = mde.summarize(rows)
    assert s["before"] == 2e-2 and s["after"] == 1e-5 and s["seeds"] == 2


def test_real_search_on_a_quantized_matmul(synth_dir, llama_lib):
    """On tiny Q8_0 the element-wise tolerance of a matmul is ~1%; the systematic slope sees a
    scale error at least 100x smaller, each localized at its exact (step, site)."""
    from harness.compare.systematic import Null
    from harness.diff import DiffRequest, capture_reference, model_for
    from harness.synth import default_fixture
    path = default_fixture("q8_0", preset="tiny", seed=0, cache_dir=synth_dir)
    req = DiffRequest(path, tokens=[5, 17, 300, 41, 9, 77, 2, 640, 31], steps=1)
    ref = capture_reference(req)
    model = model_for(req, ref)
    null = Null()
    clean_table, clean = mde.evaluate(model, ref, (), null)
    assert clean.before is None and clean.after is None
    s = mde.Search(model, ref, "blk.1.ffn_up", "scale", 0, null, clean_table)
    assert s.localized(0.1, "before") and s.localized(1e-4, "after") and not s.localized(1e-4, "before")
    assert not s.localized(1e-8, "after")
    before, after = s.mde("before", lo=1e-6, iters=3), s.mde("after", lo=1e-6, iters=3)
    assert after * 100 <= before
