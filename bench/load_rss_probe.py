"""Host memory while a model loads straight onto the GPU for the generated calibration source: the anonymous
part of RSS (a real host copy) against the whole RSS, which also counts the mmapped checkpoint's file pages
(the kernel can drop those). The quantize job's own sampler, 100 times a second.

    python -m bench.load_rss_probe --layers 32          (on a GPU; writes and removes a 7B-shaped model)"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from bench.quantize_speed import make_random_7b
from quantizer.jobs import MemorySampler

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.load_rss_probe needs a CUDA GPU")
    from transformers import AutoModelForCausalLM
    name = make_random_7b(args.models_dir, args.layers)
    source = args.models_dir / name
    try:
        sampler = MemorySampler(interval=0.01).start()
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float16, low_cpu_mem_usage=True,
                                                     device_map={"": torch.device("cuda", 0)})
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        sampler.stop()
        samples = sampler.snapshot()
        first, last = samples[0], samples[-1]
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
        print(f"| {torch.cuda.get_device_name()} | {args.layers} layers, {size:.0f} MB of fp16 weights | load {seconds:.1f} s "
              f"| peak anonymous +{sampler.peak('anon_mb') - first['anon_mb']:.0f} MB | peak RSS "
              f"+{sampler.peak('rss_mb') - first['rss_mb']:.0f} MB | after: anonymous "
              f"+{last['anon_mb'] - first['anon_mb']:.0f} MB, RSS +{last['rss_mb'] - first['rss_mb']:.0f} MB |")
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
