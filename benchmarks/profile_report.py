"""Profile one report on the GPU: python benchmarks/profile_report.py [TOKENS] (default 32; prefill + 8 steps).
Prints wall times of the report and its parts, the top CUDA kernels and a cProfile by own time."""
import cProfile, pstats, time, torch, sys
sys.path.insert(0, '.')
from harness.diff import DiffRequest, diff_on_device, model_for
from harness.llama.runner import LlamaRunner, LlamaOptions
from harness.synth import default_fixture
p = default_fixture('f16', preset='qwen2.5-0.5b', cache_dir='build/fixtures')
T = int(sys.argv[1]) if len(sys.argv) > 1 else 32
req = DiffRequest(p, tokens=list(range(300, 300+T)), steps=8, device='cuda', all_outputs=False)
runner = LlamaRunner(p, LlamaOptions(device='cuda', keep_on_device=True, all_outputs=False), T+16)
ref = runner.run(req.tokens, 8)
model = model_for(req, ref)
for _ in range(2):
    torch.cuda.synchronize(); t=time.time(); diff_on_device(req, model=model, runner=runner); torch.cuda.synchronize(); print('report', time.time()-t)
torch.cuda.synchronize(); t=time.time(); ref = runner.run(req.tokens, 8); torch.cuda.synchronize(); print('capture keep', time.time()-t)
t=time.time(); diff_on_device(req, model=model, ref=ref); torch.cuda.synchronize(); print('report given ref', time.time()-t)
req.local=False
t=time.time(); diff_on_device(req, model=model, ref=ref); torch.cuda.synchronize(); print('report given ref, no local', time.time()-t)
req.local=True
import harness.compare.comparator as cmpmod
null = cmpmod._default_null
cmpmod._default_null = lambda: None   # the systematic statistics off: their cost on this report
t=time.time(); diff_on_device(req, model=model, ref=ref); torch.cuda.synchronize(); print('report given ref, no systematic', time.time()-t)
cmpmod._default_null = null
cmpmod.Comparator.BATCH_SYS = False   # the systematic sums one pair at a time
t=time.time(); diff_on_device(req, model=model, ref=ref); torch.cuda.synchronize(); print('report given ref, systematic per pair', time.time()-t)
cmpmod.Comparator.BATCH_SYS = True
t=time.time(); diff_on_device(req, model=model, ref=ref); torch.cuda.synchronize(); print('report given ref (again)', time.time()-t)
t=time.time(); model.run(req.tokens, 8, ref.tokens[T:], keep_logits=False); torch.cuda.synchronize(); print('bare model run', time.time()-t)
t=time.time(); model.run_with_cache(req.tokens, 8, ref.tokens[T:], sink=lambda *a: None, to_cpu=False); torch.cuda.synchronize(); print('model run, sink drops', time.time()-t)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    diff_on_device(req, model=model, ref=ref); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
cProfile.run('diff_on_device(req, model=model, ref=ref); torch.cuda.synchronize()', '/tmp/prof')
pstats.Stats('/tmp/prof').sort_stats('tottime').print_stats(30)
pstats.Stats('/tmp/prof').sort_stats('cumulative').print_stats(30)
