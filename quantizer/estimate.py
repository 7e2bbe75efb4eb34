"""Before a job starts: how much RAM, GPU memory and disk it will need, against what the machine has."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors import safe_open

from quantizer.calibration import GENERATED
from quantizer.generated_calibration import batch_rows, row_bytes
from quantizer.layers import ShardReader, arch_for, read_config
from quantizer.settings import QuantizeSettings

MB = 2 ** 20
BASE_PROCESS_MB = 700.0  # python, torch, transformers and a tokenizer, measured on this project's stack


@dataclass
class Estimate:
    ram_mb: float
    gpu_mb: float
    disk_mb: float
    activations_mb: float
    activations_on: str
    available_ram_mb: float
    swap_free_mb: float
    gpu_free_mb: float
    disk_free_mb: float
    warnings: list[str] = field(default_factory=list)
    generated_tokens: int = 0  # calibration tokens the model writes before the first layer

    def markdown(self) -> str:
        gpu = (f"{self.gpu_mb:,.0f} MB of {self.gpu_free_mb:,.0f} MB free" if self.gpu_free_mb
               else "none (no CUDA GPU: the job runs on the CPU)")
        lines = [f"**Estimate** — peak RAM {self.ram_mb:,.0f} MB of {self.available_ram_mb:,.0f} MB available; "
                 f"GPU {gpu}; disk {self.disk_mb:,.0f} MB of {self.disk_free_mb:,.0f} MB free; "
                 f"calibration activations {self.activations_mb:,.0f} MB on {self.activations_on}."]
        if self.generated_tokens:
            lines[0] += (f" The model first writes its calibration text ({self.generated_tokens:,} tokens, "
                         "with the whole model loaded).")
        lines += [f"- ⚠️ {w}" for w in self.warnings]
        return "\n".join(lines)


def _layer_params(reader: ShardReader, prefix: str) -> int:
    total = 0
    by_file: dict[Path, list[str]] = {}
    for key in reader.keys():
        if key.startswith(prefix):
            by_file.setdefault(reader.files[key], []).append(key)
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as fh:
            for key in keys:
                shape = fh.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def estimate(source: Path, settings: QuantizeSettings, models_dir: Path | None = None) -> Estimate:
    config = read_config(source)
    arch = arch_for(config)
    reader = ShardReader(source)
    hidden = int(config["hidden_size"])
    inter = int(config.get("intermediate_size", 4 * hidden))
    vocab = int(config.get("vocab_size", 32000))
    n_layers = int(config["num_hidden_layers"])
    cuda = settings.device != "cpu" and torch.cuda.is_available()
    width = 2 if cuda else 4
    act = 2 * settings.nsamples * settings.seqlen * hidden * width / MB
    layer = _layer_params(reader, f"{arch.layers_prefix}.0.") * width / MB
    # Hessians alive at once (fp32), plus GPTQ's damped copy, Cholesky factor, inverse and the allocator's
    # slack for the largest one, plus its fp32 weight working copies (7B shape, CPU, 4 x 2048 tokens:
    # measured 4664 MB peak RSS, estimated 4578 MB)
    k_max = max(hidden, inter)
    hessians = k_max ** 2 if settings.true_sequential else 3 * hidden ** 2 + inter ** 2
    hess = 4 * (hessians + 4 * k_max ** 2) / MB
    linear_work = 3 * 4 * hidden * inter / MB
    embed = vocab * hidden * 2 / MB
    vm = psutil.virtual_memory()
    available = vm.available / MB
    gpu_free = torch.cuda.mem_get_info()[0] / MB if cuda else 0.0
    if cuda and act < 0.6 * gpu_free:
        where = "GPU"
    elif act < 0.5 * available:
        where = "RAM"
    else:
        where = "disk"
    # the embedding table is read (and freed) before the first layer, so it does not add to a layer's peak
    work = max(layer + hess + linear_work, embed) + settings.nsamples * settings.seqlen * 8 / MB
    if cuda:
        gpu = work + (act if where == "GPU" else 0)
        ram = BASE_PROCESS_MB + embed + layer / 2 + (act if where == "RAM" else 0)
    else:
        gpu = 0.0
        ram = BASE_PROCESS_MB + work + (act if where == "RAM" else 0)
    generated = str(settings.calib).lower() == GENERATED
    free_mb = gpu_free if cuda else available
    gen = _generation_mb(reader, config, settings, cuda, width, free_mb) if generated else 0.0
    # generation comes before the layers: the whole model, its KV cache and a batch of logits, then freed
    # (on a GPU the weights load straight onto it, so host memory does not hold them)
    if cuda:
        gpu = max(gpu, gen)
    else:
        ram = max(ram, BASE_PROCESS_MB + gen)
    linear = 0.0
    per_layer = _layer_params(reader, f"{arch.layers_prefix}.0.")
    linear = per_layer - 2 * hidden
    g = settings.group_size if settings.group_size > 0 else hidden
    quantized = n_layers * (linear * settings.bits / 8 + linear / g * 2 * 1.1 + hidden * 8) / MB
    other = sum(1 for k in reader.keys() if not k.startswith(arch.layers_prefix + "."))
    disk = quantized + embed * (2 if not config.get("tie_word_embeddings") else 1) + other * hidden * 2 / MB
    if where == "disk":
        disk += act
    disk_free = shutil.disk_usage(models_dir or source.parent).free / MB
    swap_free = psutil.swap_memory().free / MB
    warnings = []
    if generated and (gen > gpu_free if cuda else BASE_PROCESS_MB + gen > available + swap_free):
        warnings.append(f"the generated calibration source loads the whole model ({gen:,.0f} MB with its "
                        "cache), more than this machine has: pick builtin, c4 or a text file, which stream "
                        "the model one layer at a time")
    if ram > available:
        if ram > available + swap_free:
            warnings.append(f"needs about {ram:,.0f} MB of RAM but only {available:,.0f} MB are available: "
                            "use fewer calibration samples (nsamples) or a shorter seqlen")
        else:
            warnings.append(f"needs about {ram:,.0f} MB of RAM; {available:,.0f} MB are available, so it would "
                            "swap, which makes the job crawl: use fewer samples or a shorter seqlen")
    if where == "disk":
        warnings.append(f"the calibration activations ({act:,.0f} MB) do not fit in memory and will be spilled "
                        "to disk, which is slower: fewer samples keep them in memory")
    if cuda and gpu > gpu_free:
        warnings.append(f"needs about {gpu:,.0f} MB of GPU memory but {gpu_free:,.0f} MB are free")
    if disk > disk_free:
        warnings.append(f"needs about {disk:,.0f} MB of disk but {disk_free:,.0f} MB are free")
    if not cuda and n_layers * per_layer > 2e9:
        warnings.append("no CUDA GPU: quantizing a model this size on the CPU takes hours")
    return Estimate(ram_mb=ram, gpu_mb=gpu, disk_mb=disk, activations_mb=act, activations_on=where,
                    available_ram_mb=available, swap_free_mb=swap_free, gpu_free_mb=gpu_free,
                    disk_free_mb=disk_free, warnings=warnings,
                    generated_tokens=settings.nsamples * settings.seqlen if generated else 0)


def _generation_mb(reader: ShardReader, config: dict, settings: QuantizeSettings, cuda: bool, width: int,
                   free_mb: float) -> float:
    """Peak MB of generating the calibration text: the weights, then the batch generate_tokens picks for the
    memory left beside them (KV cache and fp32 logits of each row)."""
    weights = _layer_params(reader, "") * width  # every tensor of the model
    per_row = row_bytes(config, settings.seqlen, width)
    rows = batch_rows(settings.nsamples, torch.device("cuda" if cuda else "cpu"), per_row, free_mb * MB - weights)
    return (weights + rows * per_row) / MB
