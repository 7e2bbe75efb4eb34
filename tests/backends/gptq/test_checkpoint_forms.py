"""Every checkpoint form GPTQ tools write loads through the gptq backend to the weights an independent reader
gives: `quantizer.reference` (the dequantized-weights model built straight from the original files, through
none of the loader, the CPU kernels or the file-name rules under test). One small random LLaMA (two layers,
hidden 64, intermediate 96: 3-bit packing and a short last group at g64), quantized by round-to-nearest, then
rewritten into each form: 8, 2 and 3 bits, per-column groups, asymmetric v2 with act-order, AutoGPTQ's
sharded file names, GPTQ-for-LLaMa's file without g_idx, quant_config.json alone, optimum's config.json alone,
v1 zeros labelled v2, and a quantized head over tied embeddings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from backends.gptq import rtn
from backends.registry import create_backend
from quantizer.reference import DequantizedGPTQBackend, dequantized_state
from tests.backends.gptq.support import set_quantize_config
from tests.conftest import save_random_llama

IDS = torch.tensor([[1, 17, 305, 4096, 9, 77, 2048, 31, 5, 600, 12, 48000]])


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("forms") / "tiny-fp16", hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                             tie_word_embeddings=True, max_position_embeddings=256)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _autogptq_shards(folder: Path) -> None:
    """AutoGPTQ's sharded save: <base>-0000i-of-00002.safetensors and <base>.safetensors.index.json."""
    tensors = _tensors(folder)
    (folder / "model.safetensors").unlink()
    base = "gptq_model-4bit-32g"
    names = sorted(tensors)
    halves = {f"{base}-00001-of-00002.safetensors": names[: len(names) // 2],
              f"{base}-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (folder / f"{base}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _gptq_for_llama(folder: Path) -> None:
    """GPTQ-for-LLaMa's save: one file of any name, no g_idx tensors (groups are k // group_size)."""
    tensors = {k: v for k, v in _tensors(folder).items() if not k.endswith(".g_idx")}
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "tiny-4bit-64g.safetensors"), metadata={"format": "pt"})


def _quant_config_only(folder: Path) -> None:
    (folder / "quantize_config.json").rename(folder / "quant_config.json")
    base = json.loads((folder / "config.json").read_text())
    del base["quantization_config"]
    (folder / "config.json").write_text(json.dumps(base))


def _optimum_config_only(folder: Path) -> None:
    """optimum writes the quantization_config into config.json only, with its own extra keys."""
    qc = json.loads((folder / "quantize_config.json").read_text())
    (folder / "quantize_config.json").unlink()
    base = json.loads((folder / "config.json").read_text())
    base["quantization_config"] = {**qc, "use_exllama": True, "max_input_length": None, "tokenizer": None,
                                   "dataset": None, "use_cuda_fp16": False, "module_name_preceding_first_block": None}
    (folder / "config.json").write_text(json.dumps(base))


def _v1_labelled_v2(folder: Path) -> None:
    set_quantize_config(folder, lambda qc: qc.update(checkpoint_format="gptq_v2"))


def _head_config_still_tied(folder: Path) -> None:
    """GPTQModel quantizing the head of a tied model may leave tie_word_embeddings true in config.json."""
    base = json.loads((folder / "config.json").read_text())
    base["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(base))


FORMS = {  # name: (rtn settings, rewrite of the written folder or None, a load warning expected)
    "8bit-g32": (dict(bits=8, group_size=32), None, False),
    "2bit-g32": (dict(bits=2, group_size=32), None, False),
    "3bit-per-column": (dict(bits=3, group_size=-1), None, False),
    "4bit-g64-asym-v2-act-order": (dict(bits=4, group_size=64, sym=False, checkpoint_format="gptq_v2",
                                        desc_act=True), None, False),
    "autogptq-shards": (dict(bits=4, group_size=32), _autogptq_shards, False),
    "gptq-for-llama-no-g_idx": (dict(bits=4, group_size=64), _gptq_for_llama, False),
    "quant_config.json-only": (dict(bits=4, group_size=32), _quant_config_only, False),
    "optimum-config.json-only": (dict(bits=4, group_size=32), _optimum_config_only, False),
    "v1-labelled-v2": (dict(bits=4, group_size=32), _v1_labelled_v2, True),
    "quantized-head-tied-embeddings": (dict(bits=4, group_size=32, lm_head=True), None, False),
    "quantized-head-config-still-tied": (dict(bits=4, group_size=32, lm_head=True), _head_config_still_tied, False),
}


def _written_with_reference(form: str, tiny_fp16: Path, tmp_path: Path):
    """The form written (round-to-nearest, then its rewrite) and the reference model read from the original,
    unrewritten files: (rtn settings, whether a load warning is expected, the form's folder, the reference)."""
    settings, rewrite, warns = FORMS[form]
    original = rtn.quantize_folder(tiny_fp16, tmp_path / "original", **settings)
    folder = tmp_path / form
    shutil.copytree(original, folder)
    if rewrite is not None:
        rewrite(folder)
    reference = DequantizedGPTQBackend()
    reference.load(original, reference.validate_options({"dtype": "float32", "device": "cpu"}))
    return settings, warns, folder, reference


@pytest.mark.parametrize("form", list(FORMS))
def test_checkpoint_form_loads_to_the_reference_weights(form, tiny_fp16, tmp_path):
    settings, warns, folder, reference = _written_with_reference(form, tiny_fp16, tmp_path)
    want_state = reference.model.state_dict()
    fast, exact = (create_backend("gptq") for _ in range(2))
    try:
        fast.load(folder, fast.validate_options({"device": "cpu", "dtype": "float32"}))
        exact.load(folder, exact.validate_options({"device": "cpu", "dtype": "float32", "cpu_int4": "off"}))
        assert bool(fast.load_warnings) == warns, fast.load_warnings
        assert len(fast.quant_layers) == 2 * 7 + (1 if settings.get("lm_head") else 0)
        for name, layer in exact.quant_layers.items():  # the checkpoint's weights, to the bit
            assert torch.equal(layer.dense_weight(), want_state[name + ".weight"]), name
        for name, layer in fast.quant_layers.items():
            assert torch.equal(layer.dense_weight(), want_state[name + ".weight"]), name
        _, rewritten = dequantized_state(folder)  # the reference reads every form alike too
        assert all(torch.equal(rewritten[name + ".weight"], want_state[name + ".weight"]) for name in fast.quant_layers)
        with torch.no_grad():
            want = reference.model(input_ids=IDS).logits
            got_exact = exact.model(input_ids=IDS).logits
            got_fast = fast.model(input_ids=IDS).logits  # 2/3/4 bits: the int4 kernel from bf16 activations
        assert ((got_exact - want).norm() / want.norm()).item() < 1e-5
        assert ((got_fast - want).norm() / want.norm()).item() < 2e-2
        if settings["bits"] != 8:
            assert {layer.path for layer in fast.quant_layers.values()} == {"torch-int4"}
    finally:
        for backend in (fast, exact, reference):
            backend.unload()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels' load path)")
@pytest.mark.parametrize("form", list(FORMS))
def test_checkpoint_form_loads_to_the_reference_weights_on_cuda(form, tiny_fp16, tmp_path):
    """The same forms through the CUDA load path: kernel layouts, act-order rewrites and fused siblings."""
    _, warns, folder, reference = _written_with_reference(form, tiny_fp16, tmp_path)
    want_state = reference.model.state_dict()
    gpu = create_backend("gptq")
    try:
        # autotune off: each shape's first candidate at once (tuning tiny shapes would only cost compile time)
        gpu.load(folder, gpu.validate_options({"device": "cuda", "dtype": "float16", "autotune": False}))
        assert bool(gpu.load_warnings) == warns, gpu.load_warnings
        for name, layer in gpu.quant_layers.items():
            assert torch.allclose(layer.dense_weight().cpu(), want_state[name + ".weight"], rtol=0, atol=1e-6), name
        with torch.no_grad():
            want = reference.model(input_ids=IDS).logits
            got = gpu.model(input_ids=IDS.cuda()).logits.float().cpu()
        assert ((got - want).norm() / want.norm()).item() < 2e-2
    finally:
        gpu.unload()
        reference.unload()
