"""Decoding a 7B-shaped GPTQ model with some decoder layers' packed weights in pinned host memory
(backends/gptq/offload.py), against the same model all on the GPU and the host link's own speed, in one run.

    python -m bench.offload [--layers 32] [--gpu-layers 32,24,16,0] [--new 64] [--out DIR]

For each gpu_layers setting the checkpoint is loaded as the backend loads it (sibling fusion, compiled
norms, attention kernel, CUDA graph decoding) and decodes greedily. Baselines of the same run: a pinned
host -> GPU copy (what moving the weights onto the GPU per token would move at best) and a Triton kernel
that only reads pinned host memory in place (the most any kernel reading host memory can get). Reported:
tokens/s, the codes read from the host per token, and the host read rate the decoding step achieved,
(host bytes per token) / (step time - all-GPU step time). Needs CUDA.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends.gptq import offload  # noqa: E402
from backends.gptq.timing import graph_time_ms  # noqa: E402
from bench.decode import (build_checkpoint, fuse_for_decoding, graph_decoding, llama7b_config,  # noqa: E402
                          load_gptq)
from bench.kernels import best_read_ms  # noqa: E402
from bench.provenance import tree_commit  # noqa: E402


def h2d_copy_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes per second of a pinned host -> GPU copy."""
    host = torch.empty(nbytes // 4, dtype=torch.int32, pin_memory=True)  # torch's own pinned memory
    dev = torch.empty_like(host, device="cuda")
    ms = graph_time_ms(lambda i: dev.copy_(host, non_blocking=True), calls=4, reps=5)
    return nbytes / (ms * 1e-3)


def host_read_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes per second of the best grid of a Triton kernel that reads page-locked host memory in place."""
    host = offload.to_host(torch.randint(0, 2**31 - 1, (nbytes // 4,), dtype=torch.int32))
    return nbytes / (best_read_ms([host], per_sms=(4, 16, 64), blocks=(1024, 4096), calls=2, reps=3) * 1e-3)


def decode_with(folder: Path, gpu_layers: int, args, prompt) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    loaded, model, runtime = load_gptq(folder, torch.device("cuda"), gpu_layers=gpu_layers)
    load_s = time.perf_counter() - t
    fuse_for_decoding(model, runtime, SimpleNamespace(no_fuse_norms=False, no_fuse_siblings=False,
                                                     attention_kernel=True, no_act_order_rewrites=False))
    kernels = {id(k): k for k in ((l.group.kernel if l.group is not None else l.kernel)
                                  for l in loaded.quant_layers.values())}.values()
    host_bytes = sum(k.qweight.numel() * 4 for k in kernels if offload.on_host(k.qweight))
    gpu_gb = (torch.cuda.memory_allocated() - before) / 1e9  # this load's weights and buffers
    _, row = graph_decoding(model, prompt, args.new, torch.device("cuda"), 256)
    del model, loaded
    torch.cuda.empty_cache()
    return dict(gpu_layers=gpu_layers, load_s=load_s, host_gb=host_bytes / 1e9, gpu_gb=gpu_gb, **row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--gpu-layers", default="32,24,16,0")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--ckpt", default="/tmp/gptq-webui-bench-7b-offload")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.offload needs a CUDA GPU")
    folder = Path(args.ckpt)
    build_checkpoint(llama7b_config(args.layers), folder, bits=4, group=128)
    torch.cuda.empty_cache()
    copy_bw, read_bw = h2d_copy_bandwidth(), host_read_bandwidth()
    print(f"pinned host -> GPU copy {copy_bw / 1e9:.1f} GB/s; kernel reading pinned host memory in place "
          f"{read_bw / 1e9:.1f} GB/s", flush=True)
    prompt = torch.randint(0, 32000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for gpu_layers in (int(v) for v in args.gpu_layers.split(",")):
        rows.append(decode_with(folder, gpu_layers, args, prompt))
        print(rows[-1], flush=True)
    base = next((r for r in rows if r["host_gb"] == 0), None)
    lines = [f"### Offloaded decoding - {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} - "
             f"{torch.cuda.get_device_name()} - commit {tree_commit()}", "",
             f"Command: `python -m bench.offload {' '.join(sys.argv[1:])}`. LLaMA-7B shape ({args.layers} layers), "
             f"random weights, RTN 4-bit g128; prompt 64 tokens, {args.new} new, greedy, CUDA graph decoding with "
             f"the attention kernel. Same run: pinned host -> GPU copy {copy_bw / 1e9:.1f} GB/s, a kernel reading "
             f"pinned host memory in place {read_bw / 1e9:.1f} GB/s.", "",
             "| gpu_layers | codes on the host GB | GPU GB of the load | decode tok/s | x all on the GPU | "
             "host read rate GB/s | % of the in-place read | load s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rate = ratio = ""
        if base is not None and r["host_gb"] > 0:
            extra_s = 1 / r["tok_s"] - 1 / base["tok_s"]
            rate_bw = r["host_gb"] / extra_s if extra_s > 0 else float("inf")
            rate, ratio = f"{rate_bw:.1f}", f"{100 * rate_bw * 1e9 / read_bw:.0f}"
        vs = f"{r['tok_s'] / base['tok_s']:.3f}" if base else ""
        lines.append(f"| {r['gpu_layers']} | {r['host_gb']:.2f} | {r['gpu_gb']:.2f} | {r['tok_s']:.1f} | {vs} | "
                     f"{rate} | {ratio} | {r['load_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "offload.md").write_text(text)
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
