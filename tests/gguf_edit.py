"""Test helper: copy a GGUF with one thing broken (architecture, a tensor dropped, reshaped or retyped)."""
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter


def rewrite(src, dst, arch=None, drop=(), reshape=None, retype=None, set_keys=None):
    """``reshape`` = {name: numpy shape}; ``retype`` = {name: numpy dtype} (F32 source tensors only);
    ``set_keys`` = {metadata key: int} (replaced or added as UINT32)."""
    set_keys = dict(set_keys or {})
    r = GGUFReader(src)
    a = arch or r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, a)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        key = key.replace("qwen2.", f"{a}.", 1) if arch else key
        vtype = f.types[0]
        if key in set_keys:
            continue
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), vtype)
    for key, value in set_keys.items():
        w.add_key_value(key, value, GGUFValueType.UINT32)
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)
        if reshape and t.name in reshape:
            data = np.resize(data, reshape[t.name])
        if retype and t.name in retype:
            data = data.astype(retype[t.name])
        qtype = GGMLQuantizationType(t.tensor_type)
        raw = None if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or retype and t.name in retype else qtype
        w.add_tensor(t.name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
