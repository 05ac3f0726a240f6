"""Metadata a real GGUF may carry (harness.gguf.load): what our model cannot mirror is refused in
one line naming the key; the file type is named as llama.cpp names it."""
import pytest

from harness.gguf.load import GGUFError, file_type_name, load_gguf, open_gguf
from tests.gguf_edit import rewrite


@pytest.mark.parametrize("key, value", [
    ("qwen2.rope.scaling.factor", 4),
    ("qwen2.rope.scale_linear", 2),
    ("qwen2.rope.dimension_count", 32),
    ("qwen2.attention.value_length", 32),
])
def test_forward_changing_metadata_is_refused_naming_the_key(tmp_path, tiny_f32, key, value):
    path = rewrite(tiny_f32, tmp_path / "m.gguf", set_keys={key: value})
    with pytest.raises(GGUFError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert f"{key} = {value}" in msg and "is not supported" in msg and "\n" not in msg


@pytest.mark.parametrize("key, value", [("qwen2.rope.dimension_count", 64), ("qwen2.attention.value_length", 64),
                                        ("qwen2.rope.scaling.factor", 1)])
def test_metadata_that_agrees_with_the_model_loads(tmp_path, tiny_f32, key, value):
    path = rewrite(tiny_f32, tmp_path / "m.gguf", set_keys={key: value})
    assert load_gguf(path).config.head_dim == 64


def test_yarn_is_refused(tmp_path, tiny_f32):
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    r = GGUFReader(tiny_f32)
    w = GGUFWriter(str(tmp_path / "yarn.gguf"), "qwen2")
    for key, f in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
    w.add_key_value("qwen2.rope.scaling.type", "yarn", GGUFValueType.STRING)
    for t in r.tensors:
        w.add_tensor(t.name, t.data)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFError, match=r"qwen2\.rope\.scaling\.type = 'yarn' is not supported"):
        load_gguf(str(tmp_path / "yarn.gguf"))


def test_file_type_named_as_llama_cpp_does(tiny_gguf, request):
    want = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}[request.node.callspec.params["tiny_gguf"]]
    assert file_type_name(open_gguf(tiny_gguf)) == want
    g = load_gguf(tiny_gguf)
    assert g.file_type == want and sum(g.type_mix().values()) == len(g.types)
