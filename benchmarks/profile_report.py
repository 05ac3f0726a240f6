import cProfile, pstats, time, torch, sys
sys.path.insert(0, '.')
from harness.pipeline import DiffRequest, diff_on_device, model_for
from harness.llama_backend import LlamaRunner, LlamaOptions
from harness.synth import default_fixture
p = default_fixture('f16', preset='qwen2.5-0.5b', cache_dir='build/fixtures')
req = DiffRequest(p, tokens=list(range(300,332)), steps=8, device='cuda', all_outputs=False)
runner = LlamaRunner(p, LlamaOptions(device='cuda', keep_on_device=True, all_outputs=False), 64)
ref = runner.run(req.tokens, 8)
model = model_for(req, ref)
for _ in range(2):
    t=time.time(); diff_on_device(req, model=model, runner=runner); torch.cuda.synchronize(); print('report', time.time()-t)
t=time.time(); runner.run(req.tokens, 8, sink=lambda *a: None); print('capture', time.time()-t)
t=time.time(); ref = runner.run(req.tokens, 8); print('capture keep', time.time()-t)
t=time.time(); diff_on_device(req, model=model, ref=ref); torch.cuda.synchronize(); print('report given ref', time.time()-t)
cProfile.run('diff_on_device(req, model=model, runner=runner); torch.cuda.synchronize()', '/tmp/prof')
pstats.Stats('/tmp/prof').sort_stats('tottime').print_stats(22)
