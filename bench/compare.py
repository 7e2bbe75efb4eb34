"""Side-by-side table of (model, backend, options) entries: bits per weight, memory, perplexity,
prefill/decode tokens/s and time-to-first-token (BENCH.md section 5).

    python -m bench.compare --entry transformers:models/SmolLM2-135M-Instruct \\
        --entry bitsandbytes:models/SmolLM2-135M-Instruct:quant=nf4 \\
        --entry llama.cpp:models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text wikitext2 --seqlen 512 --windows 4 --json out.json [--record]
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from bench.provenance import tree_commit

REPO = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO / "bench" / "RESULTS.md"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entry", action="append", required=True, metavar="BACKEND:PATH[:k=v,...]",
                        help="an entry to compare (repeat; the first one is the speed baseline)")
    parser.add_argument("--text", default="wikitext2",
                        help="perplexity text: wikitext2, c4, ptb, builtin (offline prose) or a text file "
                             "(default wikitext2)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per perplexity window (default 512)")
    parser.add_argument("--windows", type=int, default=4,
                        help="number of windows, 0 = all of the text (default 4)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the speed run")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per speed run")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per entry (median reported)")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models", help="the models folder")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--csv", type=Path, help="write the results as CSV here")
    parser.add_argument("--record", action="store_true", help=f"append the table to {RESULTS_MD}")
    return parser.parse_args(argv)


def entry_path(path: str, models_dir: Path) -> str:
    """Accept `models/X` as written from the repository root as well as `X` inside the models folder."""
    candidate = Path(path)
    if not candidate.is_absolute() and not (models_dir / candidate).exists() and candidate.exists():
        return str(candidate.resolve())
    return path


def device_line() -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} "
            f"(torch threads {torch.get_num_threads()}), torch {torch.__version__}")


def record(table: str, notes: list[str], args: argparse.Namespace, argv: list[str]) -> None:
    command = "python -m bench.compare " + " ".join(shlex.quote(a) for a in argv)
    lines = [f"\n## Side by side ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"- device: {device_line()}, load average {os.getloadavg()[0]:.1f} at the end "
             "(shared machine: compare speeds within this table only)",
             f"- commit: {tree_commit()}", f"- command: `{command}`",
             f"- perplexity: {args.text}, seqlen {args.seqlen}, "
             f"{'all windows' if not args.windows else f'first {args.windows} windows'}; speed: "
             f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, "
             f"median of {args.repeats}", *[f"- note: {n}" for n in notes], "", table, ""]
    with open(RESULTS_MD, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from backends.base import BackendError
    from backends.manager import ModelManager
    from bench.compare_core import (MeasureSettings, eval_text, fairness_notes, format_table, load_entries,
                                    measure, parse_entry, to_csv, to_json, unload_slots)

    try:
        entries = [parse_entry(spec) for spec in args.entry]
        settings = MeasureSettings(args.seqlen, args.windows or None, args.prompt_tokens, args.new_tokens,
                                   args.repeats).validated()
        text = eval_text(args.text)
    except (ValueError, BackendError) as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 2
    entries = [type(e)(e.backend, entry_path(e.path, args.models_dir), e.options) for e in entries]
    manager = ModelManager(args.models_dir)

    def progress(fraction: float, what: str) -> None:
        print(f"[{fraction * 100:5.1f}%] {what}", file=sys.stderr, flush=True)

    slots = load_entries(manager, entries, progress)
    try:
        results = measure(manager, slots, text, settings, progress)
    finally:
        unload_slots(manager, slots)
    for entry, result in zip(args.entry, results):
        result.entry = entry  # report the entry exactly as it was given
    table = format_table(results)
    notes = fairness_notes(results)
    print(table)
    for note in notes:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(to_json(results) + "\n", encoding="utf-8")
    if args.csv:
        args.csv.write_text(to_csv(results), encoding="utf-8")
    if args.record:
        record(table, notes, args, argv)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
