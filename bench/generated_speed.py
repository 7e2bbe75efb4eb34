"""Speed of the generated calibration source's text generation: each step replayed from a CUDA graph over a
static cache (what a GPU job runs) against the same steps run eagerly over the same cache, same model, same
rows, same run.

    python -m bench.generated_speed --model bench-random-7b --rows 64 --tokens 128

Use the 7B-shaped model `python -m bench.quantize_speed --random-7b --keep-random` leaves in models/."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from quantizer import generated_calibration
from quantizer.pipeline import Cancelled

REPO = Path(__file__).resolve().parent.parent


def timed(source: Path, tokenizer, rows: int, tokens: int, device, graphs: bool) -> float:
    """Seconds to generate rows x tokens (model load excluded: the first report marks the start)."""
    started = {}
    generated_calibration.generate_tokens(
        source, tokenizer, rows, tokens, 0, device, torch.float16,
        lambda event: started.setdefault("t", time.perf_counter()), lambda: False, lambda: Cancelled("stop"),
        graphs=graphs)
    torch.cuda.synchronize()
    return time.perf_counter() - started["t"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench-random-7b")
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.generated_speed needs a CUDA GPU")  # on the CPU it always runs the eager forward
    from transformers import AutoTokenizer
    source = args.models_dir / args.model
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    device = torch.device("cuda", torch.cuda.current_device())
    result = {}
    for graph in (True, False, True):  # the graph path twice: its first run includes the capture's warm-up
        seconds = timed(source, tokenizer, args.rows, args.tokens, device, graph)
        result.setdefault(graph, []).append(seconds)
        print(f"{'graph' if graph else 'eager'}: {seconds:.2f} s, "
              f"{args.rows * args.tokens / seconds:.0f} tokens/s", flush=True)
    graph_s, eager_s = min(result[True]), result[False][0]
    print(f"| {torch.cuda.get_device_name()} | {args.model} | {args.rows} x {args.tokens} | eager {eager_s:.2f} s "
          f"({args.rows * args.tokens / eager_s:.0f} tok/s) | graph {graph_s:.2f} s "
          f"({args.rows * args.tokens / graph_s:.0f} tok/s) | {eager_s / graph_s:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
