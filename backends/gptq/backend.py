"""The native GPTQ engine: TransformersBackend's tokenizer, chat, sampling loop and log-probs, with
the model built by loader.py (QuantLinear layers: Triton kernels on CUDA, a torch path on CPU) and
decoding over a static KV cache: replayed from a CUDA graph on CUDA, through cpu_decoder's written-out
layers on CPU."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from backends.base import BackendError, Capabilities, GenerationChunk, OptionSpec, SamplingParams
from backends.transformers_backend import TransformersBackend

log = logging.getLogger(__name__)

CACHE_STEP = 256  # static caches grow in steps, so one graph serves many generations


class GPTQBackend(TransformersBackend):
    name = "gptq"
    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        dtypes=("float32", "float16", "bfloat16"),
        bits=(2, 3, 4, 8),
        formats=("gptq",),
        options=(
            OptionSpec("dtype", "choice", "auto", ("auto", "float32", "float16", "bfloat16"),
                       "activations: auto = float16 on CUDA, float32 on CPU"),
            OptionSpec("device", "choice", "auto", ("auto", "cpu", "cuda"), "auto: CUDA when present"),
            OptionSpec("threads", "int", 0, help="CPU threads for torch (0 = torch's default)", minimum=0),
            OptionSpec("cpu_int4", "choice", "auto", ("auto", "on", "off"),
                       "CPU: 2/3/4-bit layers on torch's packed int4 kernel (a third of the RAM of the fp32 copy, "
                       "1.9x faster decoding on the default model; decoding from bf16, 128+ tokens at once "
                       "exactly dequantized) - auto unless cpu_cache=on or torch does not vectorize it "
                       "here (measured), off = the fp32 copy"),
            OptionSpec("cpu_cache", "choice", "auto", ("auto", "on", "off"),
                       "CPU: keep the layers not on the int4 kernel dequantized in RAM (fast) - auto when they "
                       "fit; on also keeps 2/3/4-bit layers dequantized (exact, 3x the RAM)"),
            OptionSpec("cpu_decoder", "bool", True,
                       help="CPU: decoding steps run LLaMA-family layers written out in torch ops over a static KV "
                            "cache, q/k/v and gate/up each one int4 call (1.2-1.3x faster on the default model); "
                            "off = HF's forward"),
            OptionSpec("cuda_graphs", "bool", True, help="CUDA: static KV cache + CUDA graph decoding"),
            OptionSpec("autotune", "bool", True, help="CUDA: measure kernel configs per shape (cached on disk)"),
            OptionSpec("gpu_layers", "int", -1, minimum=-1,
                       help="CUDA: decoder layers whose packed weights stay on the GPU, from the first; the rest "
                            "stay in host memory and are read over PCIe (models larger than the GPU). "
                            "-1 = as many as fit"),
            OptionSpec("attention_kernel", "bool", True,
                       help="CUDA graphs: each decoding step's cache write + attention as one Triton launch per "
                            "layer instead of HF's six (7B on an H200: 325 -> 386 tok/s)"),
        ),
    )

    def __init__(self):
        super().__init__()
        self.quant_config = None
        self.checkpoint_format = None
        self.quant_layers: dict = {}
        self.runtime = None
        self._decoder = None
        self._cpu_decoder_skipped = None  # the reason last logged for decoding through the HF forward on CPU
        self._wanted_len = 0

    def _build_model(self, path: Path, options: dict):
        from backends.gptq.kernel_runtime import KernelRuntime
        from backends.gptq.tuner_cache import default_cache_file
        from backends.gptq.loader import load_checkpoint
        dtype = self._resolve_dtype(options)
        if self.device.type == "cuda":
            self.runtime = KernelRuntime(tune=bool(options.get("autotune", True)),
                                         cache_file=default_cache_file(self.device))
        cache = {"auto": None, "on": True, "off": False}[options.get("cpu_cache", "auto") or "auto"]
        gpu_layers = int(options.get("gpu_layers", -1)) if self.device.type == "cuda" else None
        loaded = load_checkpoint(path, self.device, dtype, runtime=self.runtime, cache_dequantized=cache,
                                 gpu_layers=gpu_layers, cpu_int4=options.get("cpu_int4", "auto") or "auto")
        self.quant_config = loaded.config
        self.checkpoint_format = loaded.checkpoint_format
        self.load_warnings = loaded.warnings
        self.quant_layers = loaded.quant_layers
        if self.runtime is not None:
            self.runtime.reserve_workspace([l.kernel for l in self.quant_layers.values() if l.kernel is not None],
                                           dtype, self.device)
            from backends.gptq.act_order import fold_mlp_orders, presort_inputs
            from backends.gptq.fusion import fuse_siblings
            fold_mlp_orders(loaded.model)  # act-order: down_proj's input comes sorted, no gather
            fuse_siblings(loaded.model, self.runtime)  # q/k/v and gate/up as one launch each
            if options.get("cuda_graphs", True):
                from backends.gptq.cuda_graph import (fuse_gated_activation, fuse_norms, fuse_residual_norms,
                                                      fuse_rotary)
                fuse_norms(loaded.model)  # one kernel per norm instead of ~6: matters once graphs remove launches
                fuse_residual_norms(loaded.model)  # each residual add inside the norm after it
                fuse_rotary(loaded.model)  # one kernel for q and k instead of ~12
                fuse_gated_activation(loaded.model)  # silu(gate) * up in one kernel instead of two
                if options.get("attention_kernel", True):
                    from backends.gptq.decode_attention import route_decode_attention
                    route_decode_attention(loaded.model)
                # act-order: the norms and the attention write their output in their readers' order
                presort_inputs(loaded.model)
        self._decoder = None
        return loaded.model

    def unload(self) -> None:
        self._decoder = None
        self.quant_layers = {}
        self.runtime = None
        super().unload()

    def _tensors(self):
        """The packed tensors live outside parameters and buffers: the kernels' (KernelLayer), the CPU int4
        kernel's (cpu_int4.Int4Weight) and the checkpoint's own where a layer dequantizes per forward."""
        yield from super()._tensors()
        kernels = [l.kernel for l in self.quant_layers.values() if l.kernel is not None]
        kernels += [l.group.kernel for l in self.quant_layers.values() if l.group is not None]
        for k in kernels:
            yield from (t for t in (k.qweight, k.scales, k.zeros, k.perm) if t is not None)
        for layer in self.quant_layers.values():
            if layer.int4 is not None:
                yield from layer.int4.tensors()
            if layer.packed is not None:
                yield from (t for t in layer.packed if isinstance(t, torch.Tensor))

    def bits_per_weight(self) -> float:
        """Bits per weight of the quantized linears as stored: codes plus fp16 scales and the zeros."""
        bits = total = 0
        qc = self.quant_config
        for layer in self.quant_layers.values():
            K, N = layer.in_features, layer.out_features
            G = 1 if qc.group_size == -1 else -(-K // qc.group_size)
            bits += K * N * qc.bits + G * N * (16 + qc.bits)
            total += K * N
        return bits / total if total else 16.0

    # -- generation ------------------------------------------------------------------------
    def generate_ids(self, ids: Sequence[int], params: SamplingParams,
                     stop_event: threading.Event | None = None) -> Iterator[GenerationChunk]:
        self._require()
        # the static cache must hold prompt + answer; the sampling loop itself clips to the context
        self._wanted_len = min(self.context_length, len(ids) + params.max_new_tokens + 1)
        yield from super().generate_ids(ids, params, stop_event)

    def _forward_step(self):
        wanted = min(self.context_length, -(-max(self._wanted_len, 1) // CACHE_STEP) * CACHE_STEP)
        if self.device.type == "cpu":
            return self._cpu_step(wanted)
        if self.device.type != "cuda" or not self.options.get("cuda_graphs", True):
            return None
        from backends.gptq.cuda_graph import GraphDecoder
        if self._decoder is None or self._decoder.max_len < wanted:
            self._decoder = GraphDecoder(self.model, self.device, wanted)
        return self._decoder.step

    def _cpu_step(self, wanted: int):
        """The CPU decoder's step (cpu_decoder.py), or None (HF's forward) where it is off or the model is not
        one it writes out."""
        if not self.options.get("cpu_decoder", True):
            return None
        from backends.gptq.cpu_decoder import CpuDecoder
        try:
            if self._decoder is None:
                self._decoder = CpuDecoder(self.model, wanted)
            elif self._decoder.max_len < wanted:
                self._decoder.resize(wanted)
        except BackendError as exc:  # a model it does not write out: the step's own check says why
            if str(exc) != self._cpu_decoder_skipped:
                log.info("CPU decoding through the HF forward: %s", exc)
                self._cpu_decoder_skipped = str(exc)
            return None
        return self._decoder.step
