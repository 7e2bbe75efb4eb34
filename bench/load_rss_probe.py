"""Host memory while a model loads straight onto the GPU for the generated calibration source: anonymous
memory (a real host copy) against file pages of the mmapped checkpoint, which RSS also counts and the
kernel can drop. `bench.quantize_speed` reports RSS, which does not tell the two apart.

    python -m bench.load_rss_probe --layers 32          (on a GPU; writes and removes a 7B-shaped model)"""
from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

import torch

from bench.quantize_speed import make_random_7b

REPO = Path(__file__).resolve().parent.parent


def status_kb() -> dict:
    """RssAnon and RssFile of this process, in kB (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


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
        base = status_kb()
        peak = dict(base)
        done = threading.Event()

        def sample():
            while not done.is_set():
                for key, value in status_kb().items():
                    peak[key] = max(peak[key], value)
                time.sleep(0.01)
        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float16, low_cpu_mem_usage=True,
                                                     device_map={"": torch.device("cuda", 0)})
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        done.set()
        watcher.join()
        after = status_kb()
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
        print(f"| {torch.cuda.get_device_name()} | {args.layers} layers, {size:.0f} MB of fp16 weights | load {seconds:.1f} s "
              f"| peak RssAnon +{(peak['RssAnon'] - base['RssAnon']) / 1024:.0f} MB | peak RssFile "
              f"+{(peak['RssFile'] - base['RssFile']) / 1024:.0f} MB | after: RssAnon +{(after['RssAnon'] - base['RssAnon']) / 1024:.0f}"
              f" MB, RssFile +{(after['RssFile'] - base['RssFile']) / 1024:.0f} MB |")
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
