# Two commands a newcomer needs: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build of torch unless the caller says otherwise (a bare `torch` pulls GBs of CUDA wheels).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_MODEL := build/fixtures/tiny-f32-s0.gguf

.PHONY: env demo test clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

$(DEMO_MODEL): $(STAMP)
	$(VENV)/bin/llamadiff synth $@ --preset tiny --type f32 --seed 0

demo: $(DEMO_MODEL)
	@echo "== clean model: our PyTorch Qwen2 vs llama.cpp (CPU), prefill + 4 decode steps =="
	$(VENV)/bin/llamadiff report $(DEMO_MODEL) --prompt "The quick brown fox" --steps 4
	@echo
	@echo "== the same with an injected bug (QKV biases dropped); exit code 1 is expected =="
	-$(VENV)/bin/llamadiff report $(DEMO_MODEL) --prompt "The quick brown fox" --steps 4 --inject drop_qkv_bias

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra

clean:
	rm -rf $(VENV) build
