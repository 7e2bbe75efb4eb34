"""Quality table of BENCH.md section 4: wikitext2 perplexity of fp, RTN and GPTQ variants of the
default model. Each variant is quantized through the real pipeline into models/, evaluated through
its dequantized weights (the reference every kernel must match), then deleted.

    python -m bench.quantize_quality --nsamples 32 --seqlen 512 --windows 40 \
        --variant rtn-4g128:method=rtn,bits=4,group_size=128 --variant gptq-4g128:bits=4,group_size=128

Prints one row per variant and appends the table to bench/RESULTS.md (with --record)."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# run as a file (`python bench/...py`), Python puts bench/ first on the path, where bench/kernels.py shadows the
# `kernels` package transformers imports (loading a tokenizer failed): only the repository root goes there
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from backends.registry import create_backend  # noqa: E402
from bench.provenance import tree_commit  # noqa: E402
from quantizer.evaluation import load_eval_text, perplexity  # noqa: E402
from quantizer.pipeline import plan, run  # noqa: E402
from quantizer.reference import DequantizedGPTQBackend  # noqa: E402
from quantizer.settings import QuantizeSettings  # noqa: E402

DEFAULT_VARIANTS = [
    "rtn-4g128:method=rtn,bits=4,group_size=128",
    "gptq-4g128:bits=4,group_size=128",
    "gptq-4g128-act:bits=4,group_size=128,act_order=1,static_groups=1",
    "rtn-3g128:method=rtn,bits=3,group_size=128",
    "gptq-3g128:bits=3,group_size=128",
    "rtn-2g64:method=rtn,bits=2,group_size=64",
    "gptq-2g64:bits=2,group_size=64",
    "rtn-4pc:method=rtn,bits=4,group_size=-1",
    "gptq-4pc:bits=4,group_size=-1",
]


def parse_variant(text: str, base: dict) -> tuple[str, QuantizeSettings]:
    name, _, spec = text.partition(":")
    values = dict(base)
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition("=")
        field_type = QuantizeSettings.__dataclass_fields__[key].type
        if "bool" in str(field_type):
            values[key] = raw.lower() in ("1", "true", "yes")
        elif "int" in str(field_type) and "float" not in str(field_type):
            values[key] = int(raw)
        elif "float" in str(field_type):
            values[key] = None if raw == "none" else float(raw)
        else:
            values[key] = raw
    return name, QuantizeSettings(**values)


def evaluate(backend, text, seqlen, windows) -> float:
    return perplexity(backend, text, seqlen, windows).ppl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default: --seqlen)")
    ap.add_argument("--variant", action="append", help="name:key=value,... (QuantizeSettings fields)")
    ap.add_argument("--no-fp", action="store_true", help="skip the fp baseline row")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen)
    variants = [parse_variant(v, base) for v in (args.variant or DEFAULT_VARIANTS)]
    text = load_eval_text("wikitext2")
    eval_seqlen = args.eval_seqlen or args.seqlen
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "float16" if device == "cuda" else "float32"
    rows = []
    fp = None
    if not args.no_fp:
        backend = create_backend("transformers")
        backend.load(args.models_dir / args.model, backend.validate_options({"dtype": dtype, "device": device}))
        fp = evaluate(backend, text, eval_seqlen, args.windows)
        backend.unload()
        rows.append(("fp", fp, None, None))
        print(f"fp  ppl {fp:.3f}", flush=True)
    for name, settings in variants:
        out = f"bench-quality-{name}"
        for leftover in (args.models_dir / out, args.models_dir / (out + ".partial")):
            shutil.rmtree(leftover, ignore_errors=True)
        t0 = time.perf_counter()
        result = run(plan(args.models_dir, args.model, out, settings))
        seconds = time.perf_counter() - t0
        backend = DequantizedGPTQBackend()
        backend.load(result.output, backend.validate_options({"dtype": dtype, "device": device}))
        ppl = evaluate(backend, text, eval_seqlen, args.windows)
        backend.unload()
        shutil.rmtree(result.output, ignore_errors=True)
        rows.append((name, ppl, seconds, settings))
        gap = f"  gap {ppl - fp:+.2f}" if fp else ""
        print(f"{name}  ppl {ppl:.3f}{gap}  quantize {seconds:.0f} s", flush=True)
    lines = ["| variant | wikitext2 ppl | gap vs fp | quantize s | settings |", "| --- | --- | --- | --- | --- |"]
    for name, ppl, seconds, settings in rows:
        gap = "" if fp is None or settings is None else f"{ppl - fp:+.2f}"
        extra = "" if settings is None else json.dumps({k: v for k, v in settings.to_dict().items()
                                                       if k not in ("calib", "nsamples", "seqlen", "seed", "device", "batch_size")})
        lines.append(f"| {name} | {ppl:.2f} | {gap} | {'' if seconds is None else f'{seconds:.0f}'} | {extra} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        commit = tree_commit()
        header = (f"\n### Quantization quality ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {device} "
                  f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, commit {commit})\n"
                  f"Command: `python {' '.join(['-m', 'bench.quantize_quality'] + (argv if argv is not None else sys.argv[1:]))}`\n"
                  f"wikitext2 test, seqlen {eval_seqlen}, first {args.windows} windows; calibration {args.calib} "
                  f"{args.nsamples} x {args.seqlen} tokens, seed 0; ppl of the dequantized checkpoint.\n\n")
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(header + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
