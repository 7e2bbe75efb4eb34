"""Speed of the generated calibration source's text generation, each device's fast steps against its plain
ones, same model, same rows, same run: on a GPU each step replayed from a CUDA graph over a static cache
against the same steps run eagerly over the same cache; on a CPU the model's forward over a cache that grows
in place (backends.growing_cache) against transformers' own concatenating cache.

    python -m bench.generated_speed --model bench-random-7b --rows 64 --tokens 128        (GPU)
    python -m bench.generated_speed --device cpu --threads 2 --rows 32 --tokens 512       (CPU, default model)

Use the 7B-shaped model `python -m bench.quantize_speed --random-7b --keep-random` leaves in models/."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from quantizer import generated_calibration
from quantizer.pipeline import Cancelled

REPO = Path(__file__).resolve().parent.parent
FAST = {"cuda": "graph", "cpu": "in-place cache"}
PLAIN = {"cuda": "eager", "cpu": "concatenating cache"}


def timed(source: Path, tokenizer, rows: int, tokens: int, device, dtype, baseline: bool) -> tuple[float, torch.Tensor]:
    """Seconds to generate rows x tokens (model load excluded: the first report marks the start), and the tokens."""
    started = {}
    out = generated_calibration.generate_tokens(
        source, tokenizer, rows, tokens, 0, device, dtype,
        lambda event: started.setdefault("t", time.perf_counter()), lambda: False, lambda: Cancelled("stop"),
        baseline=baseline)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started["t"], out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a folder in --models-dir (default: bench-random-7b on a GPU, "
                                                  "SmolLM2-135M-Instruct on a CPU)")
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.generated_speed --device cuda needs a CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    model = args.model or ("bench-random-7b" if args.device == "cuda" else "SmolLM2-135M-Instruct")
    source = args.models_dir / model
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    kind = device.type
    # the fast path twice around the plain one: on a GPU its first run includes the capture's warm-up
    result, texts = {}, {}
    for baseline in (False, True, False):
        seconds, texts[baseline] = timed(source, tokenizer, args.rows, args.tokens, device, dtype, baseline)
        result.setdefault(baseline, []).append(seconds)
        print(f"{PLAIN[kind] if baseline else FAST[kind]}: {seconds:.2f} s, "
              f"{args.rows * args.tokens / seconds:.0f} tokens/s", flush=True)
    fast_s, plain_s = min(result[False]), result[True][0]
    same = "same tokens" if torch.equal(texts[False], texts[True]) else "tokens differ (rounding)"
    name = torch.cuda.get_device_name() if kind == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"| {name} | {model} | {args.rows} x {args.tokens} | {PLAIN[kind]} {plain_s:.2f} s "
          f"({args.rows * args.tokens / plain_s:.0f} tok/s) | {FAST[kind]} {fast_s:.2f} s "
          f"({args.rows * args.tokens / fast_s:.0f} tok/s) | {plain_s / fast_s:.2f}x | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
