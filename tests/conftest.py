"""Shared fixtures: synthetic tiny qwen2 and qwen3 GGUFs, written once per test session into a tmp dir."""
import pytest
import torch

from harness.synth import WEIGHT_TYPES, SynthError, default_fixture


def _llama_or_skip():
    from harness.llama.lib import LlamaUnavailable, llama
    try:
        return llama()
    except LlamaUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def llama_lib():
    """The llama_cpp module (quiet, backend initialised); skips the test without llama-cpp-python."""
    return _llama_or_skip()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


def _fixture(synth_dir, wtype, tied=None, preset="tiny"):
    if wtype in ("q8_0", "q4_k_m"):
        _llama_or_skip()  # quantized fixtures are made by llama.cpp's quantizer
    try:
        return default_fixture(wtype, preset=preset, seed=0, cache_dir=synth_dir, tied=tied)
    except SynthError as e:
        pytest.fail(f"cannot write the {preset} {wtype} fixture: {e}")


@pytest.fixture(scope="session")
def tiny_f32(synth_dir):
    """Path of the tiny preset, F32, seed 0, untied (has output.weight)."""
    return _fixture(synth_dir, "f32")


@pytest.fixture(scope="session")
def tiny_tied_f32(synth_dir):
    """Path of the tiny preset, F32, seed 0, tied (no output.weight)."""
    return _fixture(synth_dir, "f32", tied=True)


@pytest.fixture(scope="session", params=WEIGHT_TYPES)
def tiny_gguf(request, synth_dir):
    """Path of the tiny preset (seed 0, untied) in each weight type; ``request.param`` is the type."""
    return _fixture(synth_dir, request.param)


@pytest.fixture(scope="session")
def tiny_qwen3_f32(synth_dir):
    """Path of the tiny-qwen3 preset (head size 128 from key_length, d_model / n_head = 64),
    F32, seed 0, tied (the preset's default)."""
    return _fixture(synth_dir, "f32", preset="tiny-qwen3")


@pytest.fixture(scope="session", params=WEIGHT_TYPES)
def tiny_qwen3_gguf(request, synth_dir):
    """Path of the tiny-qwen3 preset (seed 0, tied) in each weight type; ``request.param`` is the type."""
    return _fixture(synth_dir, request.param, preset="tiny-qwen3")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models: intra-op threads only add overhead, and on a busy 2-core runner they spin
    against each other (measured 3x slower in the zoo tests). Restored at the end."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
