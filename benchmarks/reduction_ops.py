"""Count the operations the comparison issues for a 512-token batch of pairs (issue 16, the 512+8 regression):
    python benchmarks/reduction_ops.py [REPO_ROOT]   (default: this checkout; e.g. an older commit checked out elsewhere)
Four layers of Qwen2.5-0.5B-shaped prefill pairs, end to end and local, through the Comparator's GPU path
(batched=True) on the CPU: aten operations that are not views (on a GPU each is a launch), segment_reduce calls,
and the CPU time (not the GPU's)."""
import sys, time, collections
root = sys.argv[1] if len(sys.argv) > 1 else "."
sys.path.insert(0, root)
import torch
from harness.compare.comparator import Comparator
from harness.compare.tolerance import Policy
g = torch.Generator().manual_seed(0)
T = 512
sites = [("attn_norm", (T, 896)), ("q_proj", (T, 14, 64)), ("q", (T, 14, 64)), ("q_rope", (T, 14, 64)),
         ("k_proj", (T, 2, 64)), ("k", (T, 2, 64)), ("k_rope", (T, 2, 64)), ("v_proj", (T, 2, 64)), ("v", (T, 2, 64)),
         ("kq", (14, T, T)), ("attn_weights", (14, T, T)), ("kqv", (T, 14, 64)), ("attn_out", (T, 896)),
         ("ffn_inp", (T, 896)), ("ffn_norm", (T, 896)), ("ffn_gate", (T, 4864)), ("ffn_up", (T, 4864)),
         ("ffn_act", (T, 4864)), ("ffn_out", (T, 896)), ("l_out", (T, 896))]
L = 4
pairs = [(f"blk.{i}.{k}", torch.randn(s, generator=g)) for i in range(L) for k, s in sites]
def run():
    c = Comparator(Policy("cuda", "F16"), batched=True, n_prompt=T)
    for name, r in pairs:
        x = r + 1e-4
        c.add(0, name, x, r); c.add_local(0, name, x, r)
    c.flush()
run()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    run()
ka = prof.key_averages()
views = {"aten::view", "aten::as_strided", "aten::reshape", "aten::slice", "aten::select", "aten::detach", "detach",
         "aten::unsqueeze", "aten::expand", "aten::narrow", "aten::resolve_conj", "aten::resolve_neg", "aten::t",
         "aten::transpose", "aten::permute", "aten::alias", "aten::_reshape_alias", "aten::lift_fresh", "aten::empty",
         "aten::empty_strided", "aten::_unsafe_view", "aten::squeeze", "aten::flatten"}
top = [e for e in ka if e.key.startswith("aten::") and e.key not in views]
print(root, "non-view aten ops:", sum(e.count for e in top), "segment_reduce:", sum(e.count for e in ka if "segment_reduce" in e.key))
t = time.perf_counter(); run(); print("cpu time", round(time.perf_counter() - t, 2))
for e in sorted(top, key=lambda e: -e.count)[:12]:
    print(f"  {e.key} {e.count}")
