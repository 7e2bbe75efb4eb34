"""GPU memory left behind by loading, chatting with and unloading a GPTQ model through the backend, over
several cycles: what a long-running web UI accumulates when models come and go.

    python -m bench.load_cycles [--cycles 4] [--gpu-layers -1] [--tokenizer .gpu_carry/tok]

A random LLaMA (8 layers, hidden 1024, the default model's 49152-token vocabulary) is RTN-quantized to
4-bit g128 once; each cycle loads it with create_backend("gptq") on CUDA, chats twice (a short and a long
prompt, so the static cache grows and the decoding graph is captured again), unloads it and collects
garbage. Prints the memory still allocated after each unload against before the first load, and where
it was allocated (torch's allocator history) when any is left. Needs CUDA and a tokenizer folder
(tokenizer.json + tokenizer_config.json).
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends.base import SamplingParams  # noqa: E402
from backends.registry import create_backend  # noqa: E402
from bench.decode import build_checkpoint  # noqa: E402


def allocation_sites(min_bytes: int = 2**20) -> list[str]:
    """The innermost named frame of each live block of at least min_bytes (needs the history on)."""
    sites = []
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated" and block["size"] >= min_bytes:
                names = [f.get("name", "?") for f in block.get("frames") or []]
                useful = [n for n in names if "Allocator" not in n and "unwind" not in n and "Traceback" not in n]
                sites.append(f"{block['size'] / 2**20:.0f} MiB (pool {segment.get('segment_pool_id')}): "
                             f"{' <- '.join(useful[:3]) or 'unknown'}")
    return sites


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--gpu-layers", type=int, default=-1)
    ap.add_argument("--tokenizer", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.load_cycles needs a CUDA GPU")
    from transformers import LlamaConfig
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "random-4bit"
        build_checkpoint(config, folder, bits=4, group=128)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(Path(args.tokenizer) / name, folder / name)
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=100000)
        print(f"{torch.cuda.get_device_name()}: {args.cycles} load / chat / unload cycles, gpu_layers {args.gpu_layers}")
        for cycle in range(1, args.cycles + 1):
            backend = create_backend("gptq")
            backend.load(folder, backend.validate_options({"device": "cuda", "gpu_layers": args.gpu_layers}))
            loaded = torch.cuda.memory_allocated() - base
            for prompt in ("hi", "hi " * 600):
                "".join(c.text for c in backend.chat([{"role": "user", "content": prompt}],
                                                     SamplingParams(max_new_tokens=8)))
            backend.unload()
            del backend
            gc.collect()
            torch.cuda.empty_cache()
            left = torch.cuda.memory_allocated() - base
            print(f"cycle {cycle}: {loaded / 2**20:.0f} MiB after load, {left / 2**20:.0f} MiB left after unload",
                  flush=True)
        for site in allocation_sites():
            print("  left:", site)
        torch.cuda.memory._record_memory_history(enabled=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
