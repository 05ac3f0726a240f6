"""harness.calibrate and the documents that quote its results (issue 17, item 3).

* the calibration turns observations into tolerances with its safety factor and floor, merges
  them into a stored table as its docstring says (expected numbers written out by hand here);
* it folds each compared row's error into the regime the policy looked up for that row;
* tolerances.json agrees with the figures the README states;
* the float16 / bfloat16 storage path widens tolerances by the documented amount, no more.
"""
import hashlib
import json
import pathlib
import re

import pytest
import torch

from harness import calibrate
from harness.compare.tolerance import POLICY_VERSION, TABLE_PATH, UNIT_SCALE_FAMILIES, Policy, Tol

ROOT = pathlib.Path(__file__).parents[1]


# -- calibrate.main: observations -> tolerances -----------------------------------------------
def _fake_measure(observations: dict):
    """A measure_file that reports ``observations`` instead of running llama.cpp."""
    def measure(path, device, prompts, steps, observed, sources, label, counts=None, dump=None):
        for regime, kinds in observations.items():
            for kind, fams in kinds.items():
                for fam, obs in fams.items():
                    observed.setdefault(regime, {}).setdefault(kind, {})[fam] = obs
                    if counts is not None:
                        counts.setdefault(regime, {}).setdefault(kind, {})[fam] = 7
            sources.setdefault(regime, set()).add(label)
        return 0.0
    return measure


def _calibrate(monkeypatch, tmp_path, observations, *args):
    monkeypatch.setattr(calibrate, "fixtures", lambda *a: [("tiny f32 s1", True, lambda: "unused.gguf")])
    monkeypatch.setattr(calibrate, "measure_file", _fake_measure(observations))
    out = tmp_path / "tolerances.json"
    assert calibrate.main(["--out", str(out), *args]) == 0
    return json.loads(out.read_text())


NEW = {"cpu/f32/float32": {"local": {"matmul": (3e-7, 5e-6), "bias": (0.0, 0.0), "softmax": (2e-7, 1e-4)},
                           "e2e": {"matmul": (4e-4, 1.5e-3)}},
       "cpu/q4/float32": {"local": {"matmul": (6e-4, 5e-3), "logits": (1e-4, 8e-3), "norm": (1e-7, 1e-6)}}}


def test_tolerance_is_ten_times_the_worst_observation_never_below_the_floor(monkeypatch, tmp_path, capsys):
    table = _calibrate(monkeypatch, tmp_path, NEW)
    reg = table["regimes"]
    assert reg["cpu/f32/float32"]["local"]["matmul"] == pytest.approx([3e-6, 5e-5])
    assert reg["cpu/f32/float32"]["local"]["softmax"] == pytest.approx([2e-6, 1e-3])
    assert reg["cpu/f32/float32"]["local"]["bias"] == pytest.approx([9.5367431640625e-07, 9.5367431640625e-06])
    assert reg["cpu/f32/float32"]["e2e"]["matmul"] == pytest.approx([4e-3, 1.5e-2])
    # a quantized class: matmul and logits share the worst of both (rel of one, max of the other)
    assert reg["cpu/q4/float32"]["local"]["matmul"] == pytest.approx([6e-3, 8e-2])
    assert reg["cpu/q4/float32"]["local"]["logits"] == pytest.approx([6e-3, 8e-2])
    assert reg["cpu/q4/float32"]["local"]["norm"] == pytest.approx([1e-6, 1e-5])
    assert table["observed"]["cpu/f32/float32"]["local"]["matmul"] == pytest.approx([3e-7, 5e-6])
    prov = table["provenance"]
    assert prov["cpu"]["command"] == f"python -m harness.calibrate --out {tmp_path / 'tolerances.json'}"
    assert prov["regimes"]["cpu/f32/float32"]["fixtures"] == ["tiny f32 s1"]
    assert prov["regimes"]["cpu/f32/float32"]["version"] == POLICY_VERSION
    assert prov["regimes"]["cpu/q4/float32"]["local_samples"] == {"matmul": 7, "logits": 7, "norm": 7}
    # the policy reads the written table back as these numbers
    pol = Policy("cpu", "Q4_K_M", table=table, site_types={"blk.0.q_proj": "Q4_K"})
    assert pol.lookup("blk.0.q_proj", "matmul")[0] == Tol(pytest.approx(6e-3), pytest.approx(8e-2))
    assert "cpu/q4/float32" in capsys.readouterr().out


def _stored(regimes: dict, versions: dict) -> dict:
    return {"observed": regimes, "regimes": {},
            "provenance": {"regimes": {r: {"version": v, "runs": [{"command": "before"}], "fixtures": ["old"],
                                           "local_samples": {"matmul": 5}} for r, v in versions.items()}}}


def test_a_run_merges_into_the_stored_table(monkeypatch, tmp_path, capsys):
    """Current-version regimes keep the worst of stored and new; older versions are replaced;
    regimes not measured now and the other backend's are kept; --fresh drops this backend's."""
    before = _stored({"cpu/f32/float32": {"local": {"matmul": [5e-7, 1e-6], "rope": [1e-7, 2e-6]}},
                      "cpu/q4/float32": {"local": {"matmul": [9e-2, 0.5]}},
                      "cpu/q8/float32": {"local": {"matmul": [1e-3, 4e-3]}},
                      "cuda/f32/float32": {"local": {"matmul": [8e-4, 5e-3]}}},
                     {"cpu/f32/float32": POLICY_VERSION, "cpu/q4/float32": POLICY_VERSION - 1,
                      "cpu/q8/float32": POLICY_VERSION, "cuda/f32/float32": POLICY_VERSION})
    (tmp_path / "tolerances.json").write_text(json.dumps(before))
    table = _calibrate(monkeypatch, tmp_path, NEW)
    reg, prov = table["regimes"], table["provenance"]["regimes"]
    assert reg["cpu/f32/float32"]["local"]["matmul"] == pytest.approx([5e-6, 5e-5])     # worst of (5e-7, 1e-6), (3e-7, 5e-6)
    assert reg["cpu/f32/float32"]["local"]["rope"] == pytest.approx([1e-6, 2e-5])       # stored, not measured now
    assert prov["cpu/f32/float32"]["local_samples"] == {"matmul": 12, "bias": 7, "softmax": 7}
    assert [r.get("command") for r in prov["cpu/f32/float32"]["runs"]][0] == "before"
    assert prov["cpu/f32/float32"]["fixtures"] == ["old", "tiny f32 s1"]
    assert reg["cpu/q4/float32"]["local"]["matmul"] == pytest.approx([6e-3, 8e-2])      # older version: replaced
    assert reg["cpu/q8/float32"]["local"]["matmul"] == pytest.approx([1e-2, 4e-2])      # kept
    assert reg["cuda/f32/float32"]["local"]["matmul"] == pytest.approx([8e-3, 5e-2])    # other backend kept
    (tmp_path / "tolerances.json").write_text(json.dumps(before))
    table = _calibrate(monkeypatch, tmp_path, NEW, "--fresh")
    assert set(table["regimes"]) == {"cpu/f32/float32", "cpu/q4/float32", "cuda/f32/float32"}
    assert table["regimes"]["cpu/f32/float32"]["local"]["matmul"] == pytest.approx([3e-6, 5e-5])
    capsys.readouterr()


def test_calibration_seeds_are_not_the_tests_seed():
    assert 0 not in calibrate.SEEDS and len(set(calibrate.SEEDS)) == len(calibrate.SEEDS)
    assert calibrate.STEPS >= 1 and max(map(len, calibrate.PROMPTS)) > 256    # decode steps; a prompt past one KV pad


def test_measure_file_folds_each_rows_worst_error_into_the_regime_of_that_row(synth_dir, llama_lib):
    """Q4_K_M: each weight matmul's local error under its own weight's class, everything else
    under the file's; the expected maxima are recomputed here from a comparison's raw rows."""
    from harness.diff import DiffRequest, diff_gguf
    from harness.synth import default_fixture
    path = default_fixture("q4_k_m", preset="tiny", seed=0, cache_dir=synth_dir)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    observed, sources, counts = {}, {}, {}
    calibrate.measure_file(path, "cpu", [prompt], 1, observed, sources, "tiny q4", counts)
    table = diff_gguf(DiffRequest(path, tokens=prompt, steps=1)).comparison.table
    want, n = {}, {}
    for row in table.to_dict("records"):
        key = (row["local_tol_regime"], "local", row["family"])
        old = want.get(key, (0.0, 0.0))
        want[key] = (max(old[0], row["local_rel_l2"]), max(old[1], row["local_max_norm"]))
        n[key] = n.get(key, 0) + 1
        key = (row["tol_regime"], "e2e", row["family"])
        old = want.get(key, (0.0, 0.0))
        want[key] = (max(old[0], row["rel_l2"]), max(old[1], row["max_norm"]))
    got = {(r, k, f): v for r, kinds in observed.items() for k, fams in kinds.items() for f, v in fams.items()}
    assert set(got) == set(want)
    for key, (rel, mx) in want.items():
        assert got[key] == pytest.approx((rel, mx), rel=1e-6, abs=1e-12), key
    assert {r for r, _, _ in got} == {"cpu/q4/float32", "cpu/q6/float32"}
    assert {f for r, k, f in got if r == "cpu/q6/float32"} == {"matmul", "logits"}     # Q6_K attn_v/ffn_down, output
    assert {k: v for k, v in n.items() if k[0] == "cpu/q6/float32"} == \
        {("cpu/q6/float32", "local", "matmul"): 4, ("cpu/q6/float32", "local", "logits"): 2}
    assert counts["cpu/q6/float32"]["local"] == {"matmul": 4, "logits": 2}
    assert sources == {"cpu/q4/float32": {"tiny q4"}, "cpu/q6/float32": {"tiny q4"}}


# -- the README's figures ------------------------------------------------------------------
README = " ".join((ROOT / "README.md").read_text().split())       # one line: sentences wrap anywhere


def _figure(text: str) -> tuple[float, float]:
    """A stated figure ("2.9e-6", "0.8%", "25%") -> (value, half a unit of its last digit)."""
    pct = text.endswith("%")
    mant, _, exp = text.rstrip("%").partition("e")
    decimals = len(mant.partition(".")[2])
    scale = (10.0 ** int(exp) if exp else 1.0) * (0.01 if pct else 1.0)
    return float(mant) * scale, 0.5 * 10.0 ** -decimals * scale


def _agrees(stated: str, actual: float, about: bool = False) -> bool:
    """``actual`` rounds to ``stated`` (``about``: is within one unit of its last digit)."""
    value, half = _figure(stated)
    return abs(actual - value) <= half * (2 if about else 1) * (1 + 1e-9)


def _table():
    with open(TABLE_PATH) as f:
        return json.load(f)


def test_readme_states_the_calibrations_safety_factor_and_floor():
    from harness.compare import tolerance
    m = re.search(r"tolerance = (\d+) × the worst error seen, never below (\d+) unit roundoffs", README)
    assert m, "the README no longer states the safety factor and the floor"
    assert (float(m.group(1)), float(m.group(2))) == (tolerance.SAFETY, tolerance.FLOOR_UNITS) == (10.0, 16.0)
    table = _table()
    assert (table["safety"], table["floor_units"]) == (10.0, 16.0)


def test_readme_cpu_weight_matmul_tolerances_are_the_tables():
    text = README.split("Local weight-matmul tolerances per class:", 1)[1].split(". ", 1)[0]
    stated = dict(re.findall(r"\b(f32|f16|q8|q6|q5|q4) (\d\.\de-\d)", text))
    assert set(stated) == {"f32", "f16", "q8", "q6", "q5", "q4"}, text
    table = _table()
    for wc, fig in stated.items():
        actual = table["regimes"][f"cpu/{wc}/float32"]["local"]["matmul"][0]
        assert _agrees(fig, actual), f"README says cpu {wc} matmul {fig}, tolerances.json has {actual:.3g}"


def test_readme_cuda_tolerances_are_the_tables():
    i = README.index("matmul-family tolerances there are")
    text = README[i:README.index("Flash attention", i)]
    stated = dict((t, v) for v, t in re.findall(r"(\d+(?:\.\d+)?%) \((F32|F16|Q8_0|Q6_K|Q4_K)\)", text))
    assert set(stated) == {"F32", "F16", "Q8_0", "Q6_K", "Q4_K"}, text
    reg = _table()["regimes"]
    cls = {"F32": "f32", "F16": "f16", "Q8_0": "q8", "Q6_K": "q6", "Q4_K": "q4"}
    for t, fig in stated.items():
        actual = reg[f"cuda/{cls[t]}/float32"]["local"]["matmul"][0]
        assert _agrees(fig, actual), f"README says cuda {t} matmul {fig}, tolerances.json has {actual:.3g}"
    cuda = {r: v["local"] for r, v in reg.items() if r.startswith("cuda/") and "norm" in v.get("local", {})}
    assert len(cuda) == 4
    m = re.search(r"attention scores and outputs about (\S+%)", text)
    assert all(_agrees(m.group(1), loc[f][0], about=True) for loc in cuda.values() for f in ("scores", "attn")), m.group(1)
    m = re.search(r"RoPE (\d\.\de-\d)", text)
    assert all(_agrees(m.group(1), loc["rope"][0]) for loc in cuda.values()), m.group(1)
    m = re.search(r"norms, biases, residuals and softmax stay between (\S+) \([^)]*\) and (\d(?:\.\d)?e-\d)", text)
    assert m, text
    lo, hi = _figure(m.group(1))[0], _figure(m.group(2))
    for loc in cuda.values():
        for f in ("norm", "bias", "residual", "softmax"):
            assert lo * (1 - 1e-3) <= loc[f][0] <= hi[0] + hi[1], (f, loc[f][0])


def test_readme_cpu_observations_are_the_tables():
    """"about 3e-7 relative for every family and weight type, except quantized weight matmuls
    [...] reach 1.6e-4 to 1e-3"."""
    m = re.search(r"local errors are about (\de-\d) relative for every family and weight type", README)
    assert m
    about = float(m.group(1))
    m = re.search(r"reach (\d\.\de-\d) to (\de-\d)", README)
    worst = {}                      # per quantized class: the worst of its matmul and logits
    for regime, kinds in _table()["observed"].items():
        if not regime.startswith("cpu/"):
            continue
        wc = regime.split("/")[1]
        for fam, (rel, _) in kinds["local"].items():
            if fam in ("matmul", "logits") and wc in ("q8", "q6", "q5", "q4"):
                worst[wc] = max(worst.get(wc, 0.0), rel)
            else:
                assert rel < 1.5 * about, (regime, fam, rel)
    assert set(worst) == {"q8", "q6", "q5", "q4"}
    assert _agrees(m.group(1), min(worst.values())) and _agrees(m.group(2), max(worst.values())), worst


# -- float16 / bfloat16 storage ------------------------------------------------------------
RUN = ROOT / "reference_runs" / "tiny-f32"


def _restored(src: pathlib.Path, dst: pathlib.Path, dtype: torch.dtype, tag: str, scale: dict | None = None):
    """A copy of the run with every tensor stored as ``dtype`` (manifest tag ``tag``);
    ``scale``: {(step, site): factor} applied before rounding (a candidate with a bug)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    m = json.loads((src / "manifest.json").read_text())
    dst.mkdir()
    for fname in m["files"]:
        with safe_open(str(src / fname), framework="pt") as f:
            out = {}
            for name in f.keys():
                step, site = name.split("/", 1)
                out[name] = (f.get_tensor(name).double() * (scale or {}).get((int(step), site), 1.0)).to(dtype)
        save_file(out, str(dst / fname), metadata={"format": "pt"})
        data = (dst / fname).read_bytes()
        m["files"][fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for e in m["tensors"]:
        e["dtype"] = tag
    m["storage_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _floor_stated_in_trace_format_doc() -> tuple[float, float]:
    doc = (ROOT / "docs" / "trace-format.md").read_text()
    m = re.search(r"\((\d\.\de-\d) for\s+float16\) and 10 times that .*? \((\d\.\de-\d)\)", doc, re.S)
    assert m, "docs/trace-format.md no longer states the float16 floor"
    return m.group(1), m.group(2)


@pytest.mark.parametrize("dtype, tag, floor", [(torch.float16, "F16", 16 * 2.0 ** -11),
                                               (torch.bfloat16, "BF16", 16 * 2.0 ** -8)])
def test_a_lower_precision_run_widens_tolerances_by_its_floor_and_no_more(tmp_path, dtype, tag, floor):
    """A run stored as float16 (bfloat16): every tolerance is at least 16 unit roundoffs of that
    type (7.8125e-3 / 6.25e-2 relative, 10x that for the worst element but of the attention weights,
    whose worst-element bound is absolute), larger calibrated ones
    are unchanged; the clean run passes, an error of 0.5x the floor passes, 3x fails at its site."""
    from harness.runs.store import StoragePolicy, compare_runs, load_run
    if dtype == torch.float16:
        rel, mx = _floor_stated_in_trace_format_doc()
        assert _agrees(rel, floor) and _agrees(mx, 10 * floor)
    storage = str(dtype).removeprefix("torch.")
    pol, base = StoragePolicy("cpu", "F32", storage=storage), Policy("cpu", "F32")
    for fam in ("matmul", "norm", "softmax", "bias", "logits"):
        for kind in ("local", "e2e"):
            t = base.tolerance(fam, kind)
            mx = floor if fam in UNIT_SCALE_FAMILIES else 10 * floor      # attention weights: absolute
            assert pol.tolerance(fam, kind) == Tol(max(t.rel, floor), max(t.max, mx)), (fam, kind)
    wide, t = StoragePolicy("cuda", "Q4_K", storage=storage), Policy("cuda", "Q4_K").tolerance("matmul")
    assert wide.tolerance("matmul") == Tol(max(t.rel, floor), max(t.max, 10 * floor))
    if dtype == torch.float16:                   # 1.6% > the float16 floor: a calibrated bound unchanged
        assert t.rel > floor and wide.tolerance("matmul") == t
    assert pol.describe()["storage_dtype"] == storage and not pol.describe()["exact"]

    ref = load_run(RUN)
    low = load_run(_restored(RUN, tmp_path / "low", dtype, tag))
    assert low.storage == storage
    cmp = compare_runs(ref, low)
    assert cmp.first is None, cmp.first.explanation
    assert cmp.meta["storage_dtype"] == storage and cmp.meta["policy"]["storage_dtype"] == storage
    rows = cmp.table.set_index(["step", "site"])
    assert rows.loc[(3, "blk.2.ffn_up"), "tol_rel"] == floor and rows.loc[(3, "blk.2.ffn_up"), "tol_max"] == 10 * floor
    for factor, flagged in ((0.5, False), (3.0, True)):
        bug = load_run(_restored(RUN, tmp_path / f"bug{factor}", dtype, tag, {(3, "blk.2.ffn_up"): 1 + factor * floor}))
        first = compare_runs(ref, bug).first
        if flagged:
            assert first is not None and (first.step, first.layer, first.site) == (3, 2, "blk.2.ffn_up")
        else:
            assert first is None, first.explanation


def test_a_recorded_q4_k_m_run_gives_each_weight_matmul_its_own_class(synth_dir, llama_lib):
    """The gate's policy takes each weight matmul's class from the run's GGUF (runs.store.policy_for
    ``site_types``): Q6_K sites of a Q4_K_M run get q6's local tolerance, not the file's q4 (2.2x
    looser); without the GGUF (``compare A B``) every site gets the file's class."""
    from harness.diff import site_weight_types
    from harness.gguf.load import load_gguf
    from harness.runs.gate import run_gate
    from harness.runs.store import load_run, policy_for
    from harness.synth import default_fixture
    run = load_run(ROOT / "reference_runs" / "tiny-q4_k_m")
    gguf = default_fixture("q4_k_m", preset="tiny", seed=0, cache_dir=synth_dir)
    pol = policy_for(run, site_types=site_weight_types(load_gguf(gguf)))
    assert pol.lookup("blk.2.v_proj", "matmul")[1] == "cpu/q6/float32"       # attn_v of the last layer is Q6_K
    assert pol.lookup("logits", "logits")[1] == "cpu/q6/float32"              # output.weight is Q6_K
    assert pol.lookup("blk.2.q_proj", "matmul")[1] == "cpu/q4/float32"
    assert policy_for(run).lookup("blk.2.v_proj", "matmul")[1] == "cpu/q4/float32"
    t = run_gate(run.path, model=gguf).comparison.table
    assert set(t.loc[t["site"] == "blk.2.v_proj", "local_tol_regime"]) == {"cpu/q6/float32"}
