"""Where a capture's time goes, on either build: python benchmarks/capture_cost.py [--device cpu|cuda]
[--preset tiny] [--type f16] [--tokens 64] [--steps 8]. Medians of 7 warm runs (bench.median_time) of: plain decode; the eval
callback installed but wanting no node; every site's node wanted but nothing copied
(``LlamaRunner.dry_capture``); the real capture. (bench.py does the same for its GPU rows.)"""
import argparse
import sys

from bench import median_time      # benchmarks/ is on the path when run as a script


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--type", default="f16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--fixtures", default="build/fixtures")
    a = ap.parse_args()
    from harness.llama.runner import LlamaOptions, LlamaRunner
    from harness.synth import default_fixture
    path = default_fixture(a.type, preset=a.preset, cache_dir=a.fixtures)
    T, S = a.tokens, a.steps
    with LlamaRunner(path, LlamaOptions(device=a.device, keep_on_device=a.device == "cuda"), T + S + 1) as r:
        prompt = [300 + i for i in range(T)]
        toks = r.run(prompt, S, capture=False).tokens[T:]
        drop = lambda *_: None  # noqa: E731
        count = []
        r.run(prompt, S, toks, sink=lambda *_: count.append(1))        # the tensors of one run
        plain = median_time(lambda: r.logits_plain(prompt, S, toks), 7)
        ask = median_time(lambda: r.run(prompt, S, toks, sink=drop, capture=False), 7)
        r.dry_capture = True
        dry = median_time(lambda: r.run(prompt, S, toks, sink=drop), 7)
        r.dry_capture = False
        cap = median_time(lambda: r.run(prompt, S, toks, sink=drop), 7)
    n = len(count)
    print(f"{a.preset} {a.type} {a.device}, {T}+{S}: plain {plain * 1e3:.1f} ms, callback wanting nothing "
          f"{ask * 1e3:.1f} ms, every site wanted without copies {dry * 1e3:.1f} ms, capture {cap * 1e3:.1f} ms; "
          f"{n} tensors per run: {(dry - ask) / n * 1e6:.1f} us sync + {(cap - dry) / n * 1e6:.1f} us copy each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
