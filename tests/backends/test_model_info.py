"""The Models table's "weights" column: read from configs and GGUF headers, never from weights."""
import json
import shutil
import struct

from backends.manager import ModelManager
from backends.model_info import describe


def _gguf(path, pairs, version=3):
    """A GGUF header with the given (key, type id, packed value) pairs and no tensors."""
    data = b"GGUF" + struct.pack("<IQQ", version, 0, len(pairs))
    for key, kind, value in pairs:
        raw = key.encode()
        data += struct.pack("<Q", len(raw)) + raw + struct.pack("<I", kind) + value
    path.write_bytes(data)
    return path


def _string_array(*items):
    body = b"".join(struct.pack("<Q", len(i.encode())) + i.encode() for i in items)
    return struct.pack("<IQ", 8, len(items)) + body


def test_the_default_models_say_how_their_weights_are_stored(default_hf_model, default_gguf):
    assert describe(default_gguf, "gguf") == "Q4_1"
    assert describe(default_hf_model, "hf") == "float16"


def test_gguf_file_type_is_found_past_arrays_and_strings(tmp_path):
    path = _gguf(tmp_path / "m.gguf", [
        ("general.name", 8, struct.pack("<Q", 3) + b"abc"),
        ("tokenizer.ggml.tokens", 9, _string_array("a", "bc", "<s>")),
        ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 3) + struct.pack("<3f", 0, 1, 2)),
        ("general.file_type", 4, struct.pack("<I", 15))])
    assert describe(path, "gguf") == "Q4_K_M"
    assert describe(_gguf(tmp_path / "f16.gguf", [("general.file_type", 4, struct.pack("<I", 1))]), "gguf") == "F16"


def test_unreadable_headers_describe_nothing(tmp_path):
    full = _gguf(tmp_path / "full.gguf", [("tokenizer.ggml.tokens", 9, _string_array("a", "b")),
                                          ("general.file_type", 4, struct.pack("<I", 2))])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(full.read_bytes()[:-6])
    huge = _gguf(tmp_path / "huge.gguf", [("x", 9, struct.pack("<IQ", 8, 2**62))])
    long_key = tmp_path / "long.gguf"
    long_key.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**40))
    without = _gguf(tmp_path / "none.gguf", [("general.name", 8, struct.pack("<Q", 1) + b"x")])
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGML" + b"\0" * 64)
    for path in (truncated, huge, long_key, without, not_gguf):
        assert describe(path, "gguf") == "", path.name


def test_gptq_and_quantized_hf_configs(tmp_path):
    eqat = tmp_path / "eqat"
    eqat.mkdir()
    (eqat / "quantize_config.json").write_text(json.dumps(
        {"bits": 2, "group_size": 64, "desc_act": False, "sym": False, "checkpoint_format": "gptq_v2"}))
    assert describe(eqat, "gptq") == "2-bit g64, asym"
    per_column = tmp_path / "pc"
    per_column.mkdir()
    (per_column / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": True, "sym": True}}))
    assert describe(per_column, "gptq") == "8-bit per-column, act-order"
    awq = tmp_path / "awq"
    awq.mkdir()
    (awq / "config.json").write_text(json.dumps({"torch_dtype": "float16", "quantization_config": {"quant_method": "awq"}}))
    assert describe(awq, "hf") == "awq"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    assert describe(broken, "hf") == "" and describe(broken, "gptq") == "" and describe(broken, None) == ""


def test_the_models_list_carries_it(tmp_path, default_gguf):
    shutil.copy(default_gguf, tmp_path / default_gguf.name)  # (a link out of the folder is refused)
    entries = {e.name: e for e in ModelManager(tmp_path).list_models()}
    assert entries[default_gguf.name].weights == "Q4_1"
