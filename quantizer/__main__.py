"""`python -m quantizer quantize ...` and `python -m quantizer eval ...` (see --help of each)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"


def _bar(fraction: float, width: int = 30) -> str:
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quantizer", description="GPTQ quantization and perplexity.")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model from the models folder into a GPTQ checkpoint")
    q.add_argument("model", help="model folder name under the models folder (fp16/bf16/fp32 safetensors)")
    q.add_argument("--out", required=True, help="name of the new checkpoint folder under the models folder")
    q.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="rows per group, -1 = per column (default 128)")
    # on by default, as in the Quantize tab: plain GPTQ loses to round-to-nearest on small models
    # (bench/RESULTS.md, "Quantization quality"), and static groups keep the checkpoint as fast as one without
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize columns in order of decreasing Hessian diagonal (desc_act; default on)")
    q.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="fit groups on the unpermuted weights, keeping g_idx monotonic with act-order (default on)")
    q.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize q/k/v, then o, then gate/up, then down, each on inputs from the "
                        "already-quantized ones (default on)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (v1 zeros; default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (written as gptq_v2)")
    q.add_argument("--damp", type=float, default=0.01, help="dampening as a fraction of mean(diag H) (default 0.01)")
    q.add_argument("--mse", action="store_true", help="search each group's range for the lowest error")
    q.add_argument("--token-clip", type=float, default=None,
                   help="cap each token's Hessian weight at this multiple of the median token norm")
    q.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="gptq (default) or round-to-nearest")
    q.add_argument("--calib", default="generated",
                   help="generated (text the model writes itself, offline; the default), builtin (offline prose), "
                        "c4, wikitext2, ptb, or a .txt/.jsonl/.parquet file")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    q.add_argument("--batch-size", type=int, default=1, help="calibration windows per layer forward")
    q.add_argument("--resume", action="store_true", help="continue an interrupted job from its last finished layer")
    q.add_argument("--models-dir", type=Path, default=MODELS_DIR)

    e = sub.add_parser("eval", help="perplexity with the GPTQ protocol; prints `ppl <value>` last")
    e.add_argument("model", help="model under the models folder (folder or .gguf)")
    e.add_argument("--backend", default=None,
                   help="engine name (default: the one the format needs); `dequantized` evaluates a GPTQ "
                        "checkpoint through its dequantized weights")
    e.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="backend load option")
    e.add_argument("--dataset", default="wikitext2", help="wikitext2, c4, ptb or a text file")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--windows", type=int, default=None, help="only the first W windows")
    e.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    return ap


def cmd_quantize(args) -> int:
    from backends.base import BackendError
    from quantizer.jobs import JobManager
    from quantizer.service import start_quantize
    from quantizer.settings import QuantizeSettings

    settings = QuantizeSettings(bits=args.bits, group_size=args.group_size, sym=args.sym, act_order=args.act_order,
                                static_groups=args.static_groups, true_sequential=args.true_sequential,
                                damp=args.damp, mse=args.mse, token_clip=args.token_clip, method=args.method,
                                calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                device=args.device, batch_size=args.batch_size)
    jobs = JobManager()
    try:
        job = start_quantize(jobs, args.models_dir, args.model, args.out, settings, resume=args.resume,
                             keep_partial_on_cancel=True)
    except (BackendError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = 0
    tty = sys.stderr.isatty()
    try:
        while not job.wait(0.5):
            snap = job.snapshot()
            for line in snap["log"][shown:]:
                print(("\r" if tty else "") + line + (" " * 20 if tty else ""), file=sys.stderr, flush=True)
            shown = len(snap["log"])
            if tty:
                print(f"\r{_bar(snap['progress'])} {snap['stage'][:60]:60s}", end="", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\ncancelling (the finished layers stay in the .partial folder; --resume continues)", file=sys.stderr)
        job.cancel()
        job.wait()
        return 130
    snap = job.snapshot()
    for line in snap["log"][shown:]:
        print(line, file=sys.stderr)
    if job.status != "done":
        if not snap["log"] or snap["log"][-1] != f"error: {job.error}":   # the log often ends with it already
            print(f"error: {job.error}", file=sys.stderr)
        return 1
    result = job.result
    print_summary(result, job)
    return 0


def print_summary(result, job) -> None:
    print(f"\nwrote {result.output}")
    print(f"{'time':>22}: {result.seconds:.1f} s (device {result.device}, activations on {result.activations}"
          + (f", resumed after layer {result.resumed_from}" if result.resumed_from else "") + ")")
    print(f"{'peak RSS':>22}: {job.peak('rss_mb'):.0f} MB (start {job.baseline_rss_mb:.0f} MB)")
    print(f"{'peak RSS + swap':>22}: {job.peak('rss_mb') + job.peak('swap_used_mb'):.0f} MB")
    print(f"{'peak GPU memory':>22}: {result.peak_gpu_mb:.0f} MB allocated, {job.peak('gpu_used_mb'):.0f} MB device-wide")
    if result.layers:
        names = list(result.layers[0]["modules"])
        short = [n.split(".")[-1] for n in names]
        print("\nrelative output error per layer (gptq / rtn):")
        print("layer  " + "  ".join(f"{s:>15}" for s in short) + "   seconds")
        for entry in result.layers:
            cells = "  ".join(f"{entry['modules'][n]['error']:7.4f}/{entry['modules'][n]['rtn_error']:.4f}" for n in names)
            print(f"{entry['layer']:5d}  {cells}   {entry['seconds']:7.1f}")
        print_timing(result.layers)


def print_timing(layers: list[dict]) -> None:
    """Seconds per stage of each layer (pipeline._Timer), then the totals; nothing for layers a job
    of an older version finished (no timing recorded)."""
    from quantizer.service import TIMING_LABELS
    timed = [entry for entry in layers if entry.get("timing")]
    if not timed:
        return
    keys = [key for key, _ in TIMING_LABELS]
    heads = ["load", "fwd-hess", "(accum)", "quantize", "fwd-out", "pack+save"]
    print("\nseconds per layer stage (fwd-hess: forwards feeding the Hessians, (accum): of which Hessian "
          "accumulation; quantize: fit + GPTQ/RTN + error statistics of all linears):")
    print("layer  " + "  ".join(f"{h:>9}" for h in heads) + "    total")
    totals = dict.fromkeys(keys, 0.0)
    for entry in timed:
        t = entry["timing"]
        for key in keys:
            totals[key] += t.get(key, 0.0)
        print(f"{entry['layer']:5d}  " + "  ".join(f"{t.get(key, 0.0):9.2f}" for key in keys)
              + f"  {entry['seconds']:7.1f}")
    print("  sum  " + "  ".join(f"{totals[key]:9.1f}" for key in keys)
          + f"  {sum(e['seconds'] for e in timed):7.1f}")


def cmd_eval(args) -> int:
    from backends.base import BackendError
    from backends.manager import ModelManager
    from quantizer.evaluation import load_eval_text, perplexity
    from quantizer.service import load_for_eval

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --option must look like key=value, got {item!r}", file=sys.stderr)
            return 2
        options[key] = value
    try:
        path = ModelManager(args.models_dir).resolve_path(args.model)
        text = load_eval_text(args.dataset)
        backend = load_for_eval(path, args.backend, options)
    except (BackendError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        result = perplexity(backend, text, args.seqlen, args.windows,
                            progress=lambda d, t: print(f"\rwindow {d}/{t}", end="", file=sys.stderr, flush=True))
    except BackendError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    finally:
        backend.unload()
    print(f"\n{path.name} [{backend.name}] {args.dataset} seqlen {result.seqlen}, {result.windows} windows, "
          f"{result.tokens} tokens, {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(f"ppl {result.ppl:.4f}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_quantize(args) if args.command == "quantize" else cmd_eval(args)


if __name__ == "__main__":
    raise SystemExit(main())
