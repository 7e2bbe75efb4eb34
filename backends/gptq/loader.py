"""Build a runnable model from a GPTQ checkpoint folder (ours, AutoGPTQ, GPTQModel, GPTQ-for-LLaMa,
optimum, EfficientQAT -GPTQ).

Order of work, so that a bad checkpoint fails fast and nothing large is allocated first:
1. read the quantize config and the safetensors headers (shapes and dtypes only);
2. build the HF model skeleton from config.json with no weights (meta device);
3. validate every quantized layer's tensors against the skeleton and the supported combinations,
   naming the layer in the message;
4. only then read tensors (memory-mapped, one at a time) into QuantLinear modules and parameters.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from backends.base import BackendError
from backends.gptq import format as fmt
from backends.gptq import offload
from backends.gptq.cpu_int4 import kernel_is_fast as int4_kernel_is_fast
from backends.gptq.cpu_int4 import takes as int4_takes
from backends.gptq.kernel_runtime import KernelRuntime
from backends.gptq.quant_linear import QuantLinear

log = logging.getLogger(__name__)
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    config: fmt.QuantizeConfig
    checkpoint_format: str
    warnings: list[str] = field(default_factory=list)
    quant_layers: dict[str, QuantLinear] = field(default_factory=dict)
    host_layers: list[int] = field(default_factory=list)  # decoder layers whose codes stay in host memory


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    from safetensors import safe_open
    index: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    index[name] = TensorInfo(path, tuple(sl.get_shape()), str(sl.get_dtype()))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise BackendError(f"{path.name} is not a readable safetensors file: {exc}") from None
    return index


def build_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The HF model with parameters on the meta device (no memory) and real buffers (rotary tables)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        raise BackendError(f"{folder.name}/config.json cannot be used: {exc}") from None
    if getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config  # our loader does the quantization; transformers must not
        except AttributeError:
            pass
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    except Exception as exc:
        raise BackendError(f"{folder.name}: model type {getattr(config, 'model_type', '?')!r} cannot be "
                           f"built by transformers without remote code: {exc}") from None
    return model


def _check_layer(name: str, module: nn.Module, headers: dict[str, TensorInfo], qc: fmt.QuantizeConfig) -> None:
    """Raise BackendError naming the layer when its tensors do not fit the skeleton or the format."""
    if not isinstance(module, nn.Linear):
        raise BackendError(f"{name}: has GPTQ tensors but is a {type(module).__name__}, not a linear layer")
    K, N, b = module.in_features, module.out_features, qc.bits
    if b == 3 and (K % 32 or N % 32):
        raise BackendError(f"{name}: 3-bit layers need input and output sizes that are multiples of 32; "
                           f"this one is {K} x {N}")
    vpw = 32 // b if b != 3 else 32
    if K % vpw or (N * b) % 32:
        raise BackendError(f"{name}: {K} x {N} cannot be packed at {b} bits (K must be a multiple of {vpw})")
    G = fmt.num_groups(K, qc.group_size)
    expect = {"qweight": ((K * b // 32, N), "I32"), "qzeros": ((None, N * b // 32), "I32"),
              "scales": ((None, N), None)}
    for suffix, (shape, dtype) in expect.items():
        info = headers.get(f"{name}.{suffix}")
        if info is None:
            raise BackendError(f"{name}: the checkpoint has no {suffix} tensor")
        if len(info.shape) != 2 or any(e is not None and e != s for e, s in zip(shape, info.shape)):
            want = tuple("G" if e is None else e for e in shape)
            raise BackendError(f"{name}.{suffix}: shape {list(info.shape)} does not match the model "
                               f"(expected {list(want)} for a {K} x {N} layer at {b} bits)")
        if dtype and info.dtype != dtype:
            raise BackendError(f"{name}.{suffix}: dtype {info.dtype}, expected int32")
    g_rows = headers[f"{name}.scales"].shape[0]
    if headers[f"{name}.qzeros"].shape[0] != g_rows:
        raise BackendError(f"{name}: qzeros has {headers[f'{name}.qzeros'].shape[0]} groups, scales {g_rows}")
    if g_rows != G and not (qc.group_size == -1 and g_rows == 1):
        raise BackendError(f"{name}: {g_rows} groups stored, but group_size {qc.group_size} over {K} inputs "
                           f"gives {G}")
    gi = headers.get(f"{name}.g_idx")
    if gi is not None and gi.shape != (K,):
        raise BackendError(f"{name}.g_idx: shape {list(gi.shape)}, expected [{K}]")
    bias = headers.get(f"{name}.bias")
    if bias is not None and bias.shape != (N,):
        raise BackendError(f"{name}.bias: shape {list(bias.shape)}, expected [{N}]")


def _get(files_cache: dict, info: TensorInfo, name: str) -> torch.Tensor:
    from safetensors import safe_open
    fh = files_cache.get(info.file)
    if fh is None:
        fh = files_cache[info.file] = safe_open(str(info.file), framework="pt")
    return fh.get_tensor(name)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def load_checkpoint(folder: Path, device: torch.device, dtype: torch.dtype, runtime: KernelRuntime | None = None,
                    cache_dequantized: bool | None = None, gpu_layers: int | None = None,
                    cpu_int4: str = "auto") -> LoadedCheckpoint:
    """gpu_layers (CUDA): how many decoder layers, from the first, keep their packed codes on the GPU;
    the others' stay in pinned host memory, where the kernels read them (offload.py). -1: as many as
    fit in the free GPU memory, less room for the KV cache and activations. None: all on the GPU.
    cache_dequantized (CPU): keep layers dequantized in `dtype` (None: when they fit in free RAM).
    cpu_int4 (CPU): 2/3/4-bit layers on torch's packed int4 kernel (cpu_int4.py; decoding from bf16, so not
    bit-exact; 128 rows and more through exactly dequantized runs of columns): "auto" wherever it takes them
    unless cache_dequantized is True (the fp32 copy asked for) or the kernel is not vectorized on this machine
    (cpu_int4.kernel_is_fast), "on" wherever it takes them, "off" never."""
    folder = Path(folder)
    qc = fmt.read_quantize_config(folder)
    files = fmt.find_weight_files(folder, qc)
    headers = read_headers(files)
    model = build_skeleton(folder, dtype)

    quant_names = sorted({k.rsplit(".", 1)[0] for k in headers if k.endswith(".qweight")})
    if not quant_names:
        raise BackendError(f"{folder.name}: no quantized layers (no *.qweight tensors) in the weight files")
    modules = dict(model.named_modules())
    for name in quant_names:
        if name not in modules:
            raise BackendError(f"{name}: quantized in the checkpoint but absent from the model built from config.json")
        _check_layer(name, modules[name], headers, qc)
    unknown = [k for k in headers if k.rsplit(".", 1)[0] not in quant_names and k not in model.state_dict()]
    if unknown:
        log.warning("%s: ignoring %d tensors the model does not use (e.g. %s)", folder.name, len(unknown), unknown[0])

    cache = _dense_fits(modules, quant_names, dtype) if cache_dequantized is None else cache_dequantized
    on_int4 = set()
    if device.type == "cpu" and (cpu_int4 == "on" or (cpu_int4 == "auto" and cache_dequantized is not True
                                                      and int4_kernel_is_fast())):
        on_int4 = {n for n in quant_names if int4_takes(qc.bits, modules[n].in_features, modules[n].out_features,
                                                        modules[n].in_features if qc.group_size == -1 else qc.group_size)}
        if cache_dequantized is None and on_int4:  # the layers left may fit now
            cache = _dense_fits(modules, [n for n in quant_names if n not in on_int4], dtype)
    host_layers = _host_layers(gpu_layers, device, model, modules, quant_names, headers, qc, dtype)

    handles: dict = {}
    warnings: list[str] = []
    first = quant_names[0]
    checkpoint_format, warning = fmt.resolve_checkpoint_format(qc, _get(handles, headers[first + ".qzeros"], first + ".qzeros"))
    if warning:
        warnings.append(warning)
        log.warning("%s: %s", folder.name, warning)

    g_idxs = {}  # read and checked before any layer is built: a broken one must not cost a half-loaded model
    for name in quant_names:
        G = headers[f"{name}.scales"].shape[0]
        if f"{name}.g_idx" in headers:
            g_idx = _get(handles, headers[f"{name}.g_idx"], f"{name}.g_idx").to(torch.int32)
            if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
                raise BackendError(f"{name}.g_idx: group indices outside [0, {G})")
        else:
            g_idx = fmt.default_g_idx(modules[name].in_features, qc.group_size)
        g_idxs[name] = g_idx

    layers: dict[str, QuantLinear] = {}
    for name in quant_names:
        t = {s: _get(handles, headers[f"{name}.{s}"], f"{name}.{s}") for s in QUANT_SUFFIXES
             if f"{name}.{s}" in headers and s != "g_idx"}
        g_idx = g_idxs.pop(name)
        layer = QuantLinear.from_packed(
            name, t["qweight"], t["qzeros"], t["scales"], g_idx, t.get("bias"), bits=qc.bits,
            group_size=qc.group_size, checkpoint_format=checkpoint_format, device=device, dtype=dtype,
            runtime=runtime, cache_dequantized=cache,
            codes_on_host=offload.decoder_layer_index(name) in host_layers, cpu_int4=name in on_int4)
        _set_submodule(model, name, layer)
        layers[name] = layer

    plain = {}
    expected = model.state_dict()
    for key, info in headers.items():
        if key.rsplit(".", 1)[0] in quant_names or key not in expected:
            continue
        tensor = _get(handles, info, key)
        plain[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(plain, strict=False, assign=True)
    _tie_or_check(model, folder)
    model.to(device)
    handles.clear()
    slow = _slow_layers_warning(layers, device, cache_dequantized)
    if slow:
        warnings.append(slow)
        log.warning("%s: %s", folder.name, slow)
    if host_layers:
        host_bytes = sum(l.kernel.qweight.numel() * 4 for l in layers.values()
                         if l.kernel is not None and offload.on_host(l.kernel.qweight))
        size = f"{host_bytes / 1e9:.1f} GB" if host_bytes >= 1e9 else f"{host_bytes / 1e6:.0f} MB"
        total = len({offload.decoder_layer_index(n) for n in quant_names} - {None})
        warnings.append(f"{len(host_layers)} of {total} decoder layers keep their packed weights in host memory "
                        f"({size}, read over PCIe at every token), so decoding runs at the speed of that "
                        "link: free GPU memory (or raise gpu_layers) to keep more on the GPU")
        log.warning("%s: %s", folder.name, warnings[-1])
    return LoadedCheckpoint(model=model, config=qc, checkpoint_format=checkpoint_format, warnings=warnings,
                            quant_layers=layers, host_layers=sorted(host_layers))


def _slow_layers_warning(layers: dict, device: torch.device, cache_dequantized: bool | None) -> str | None:
    """What a user must know when layers miss the fast paths, so that slow decoding or a large footprint is
    not a mystery: on CUDA, layers the kernels do not take (act-order groups of unequal size, zero points
    outside 0-255) run a dequantized copy; on CPU, layers without a copy are dequantized at every forward."""
    if device.type == "cuda":
        names = [n for n, l in layers.items() if l.path == "torch-cached"]
        if names:
            width = torch.finfo(layers[names[0]].weight_cache.dtype).bits
            return (f"{len(names)} of {len(layers)} quantized layers (first: {names[0]}) have act-order groups of "
                    "unequal size or zero points outside 0-255, which the GPU kernels do not take: they run a "
                    f"dequantized copy ({width} bits a weight instead of {layers[names[0]].bits}, slower decoding)")
        return None
    names = [n for n, l in layers.items() if l.path == "torch-dequant"]
    if not names:
        return None
    why = ("cpu_cache=off" if cache_dequantized is False else
           "their dequantized copy would leave less than a quarter of the free RAM")
    return (f"{len(names)} of {len(layers)} quantized layers (first: {names[0]}) are dequantized at every forward "
            f"({why}), so generation is slow; free RAM, or set cpu_cache=on to keep the copy anyway")


def _host_layers(gpu_layers: int | None, device: torch.device, model, modules: dict, quant_names: list[str],
                 headers: dict, qc, dtype: torch.dtype) -> set[int]:
    """The decoder layers whose codes stay in host memory (see load_checkpoint's gpu_layers)."""
    if device.type != "cuda" or gpu_layers is None:
        return set()
    if gpu_layers >= 0:
        return {i for i in map(offload.decoder_layer_index, quant_names) if i is not None and i >= gpu_layers}
    largest = max(modules[n].in_features * modules[n].out_features for n in quant_names)
    budget = offload.free_for_weights(device, offload.reserve_bytes(model.config, dtype, largest))
    return set(_plan_offload(quant_names, headers, qc, dtype, budget))


def _plan_offload(quant_names: list[str], headers: dict, qc, dtype: torch.dtype, budget: int) -> list[int]:
    """Which decoder layers keep their codes on the host so that the weights take at most `budget`
    bytes of GPU memory (offload.plan_host_layers), from the header sizes: the codes of each decoder
    layer, and everything else as the GPU will hold it (floats in the model's dtype, zeros one byte
    each, act-order perms as int32)."""
    width = torch.finfo(dtype).bits // 8
    per_layer: dict[int, int] = {}
    other = 0
    for key, info in headers.items():
        base, _, suffix = key.rpartition(".")
        numel = math.prod(info.shape)
        if base in quant_names and suffix == "qweight":
            index = offload.decoder_layer_index(base)
            if index is not None:
                per_layer[index] = per_layer.get(index, 0) + offload.codes_bytes(info.shape)
                continue
            other += offload.codes_bytes(info.shape)
        elif base in quant_names and suffix == "qzeros":
            other += numel * 32 // qc.bits
        elif info.dtype.startswith(("F", "BF")):
            other += numel * width
        else:
            other += numel * 4
    return offload.plan_host_layers(per_layer, other, budget)


def _tie_or_check(model: nn.Module, folder: Path) -> None:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if (isinstance(head, nn.Linear) and head.weight.device.type == "meta"
            and getattr(model.config, "tie_word_embeddings", False)):
        head.weight = emb.weight
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if missing:
        raise BackendError(f"{folder.name}: the weight files lack {len(missing)} tensors the model needs "
                           f"(first: {missing[0]})")


def _dense_fits(modules: dict, quant_names: list[str], dtype: torch.dtype) -> bool:
    """Whether caching every layer dequantized (CPU path) leaves at least a quarter of free RAM."""
    need = sum(modules[n].in_features * modules[n].out_features for n in quant_names) * torch.finfo(dtype).bits // 8
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        available = info.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        return True
    return need < 0.75 * available
