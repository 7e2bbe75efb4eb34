"""What scoring costs on top of the model's own evaluation, per engine: `token_logprobs` (perplexity,
Compare's Measure) and `score_tokens` with 5 alternatives (the API's log-probs), against one plain
evaluation of the same tokens in the same run (transformers: the model's forward; llama.cpp: its batched
decode with the logits of every position).

    python -m bench.scoring_speed [--tokens 1500] [--repeats 2] [--record]

Text: the first tokens of WikiText-2 test (the shared data folder, as `quantizer eval` reads it). Prints each engine's median seconds and the
ratios to its plain evaluation; --record appends them to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO / "bench" / "RESULTS.md"
ENGINES = (("transformers fp32", "SmolLM2-135M-Instruct", "transformers", {"dtype": "float32", "device": "cpu"}),
           ("llama.cpp Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama.cpp", {}))


def plain_evaluation(backend, ids):
    """One evaluation of `ids` with the logits of every position, nothing computed from them."""
    if backend.name == "llama.cpp":
        llm = backend.llm
        llm.reset()
        llm._ctx.kv_cache_clear()
        for start in range(0, len(ids), llm.n_batch):
            llm._batch.set_batch(batch=ids[start:start + llm.n_batch], n_past=start, logits_all=True)
            llm._ctx.decode(llm._batch)
        llm.reset()
        return
    import torch
    with torch.inference_mode():
        backend.model(input_ids=torch.tensor([ids]), use_cache=False)


def wikitext_or_none(chars: int) -> str | None:
    """The first `chars` of WikiText-2 test as the evaluation reads it (quantizer.evaluation: the shared
    data folder, $GPTQ_WEBUI_SHARED), or None after saying why."""
    from backends.base import BackendError
    from quantizer.evaluation import load_eval_text
    try:
        return load_eval_text("wikitext2")[:chars]
    except BackendError as exc:
        print(f"needs WikiText-2: {exc}", file=sys.stderr)
        return None


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    from backends.manager import ModelManager
    from bench.provenance import tree_commit
    text = wikitext_or_none(args.tokens * 8)
    if text is None:
        return 2
    manager = ModelManager(REPO / "models")
    rows = []
    for label, name, engine, options in ENGINES:
        model_id = manager.load(name, engine, options)
        backend = manager.get(model_id).backend
        ids = backend.tokenize(text)[:args.tokens]
        plain = timed(lambda: plain_evaluation(backend, ids), args.repeats)
        logprobs = timed(lambda: backend.token_logprobs(ids), args.repeats)
        scored = timed(lambda: backend.score_tokens(ids, 5), args.repeats)
        manager.unload(model_id)
        rows.append(f"| {label} | {len(ids)} | {plain:.2f} | {logprobs:.2f} ({logprobs / plain:.2f}x) | "
                    f"{scored:.2f} ({scored / plain:.2f}x) |")
    table = ["| engine | tokens | plain evaluation s | token_logprobs s | score_tokens top 5 s |",
             "|---|---:|---:|---:|---:|", *rows]
    print("\n".join(table))
    if args.record:
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        head = (f"\n## Scoring cost over the model's evaluation ({when}, {platform.processor() or platform.machine()}, "
                f"CPU, commit {tree_commit()})\n\n`python -m bench.scoring_speed --tokens {args.tokens} "
                f"--repeats {args.repeats}` (medians)\n\n")
        with open(RESULTS_MD, "a", encoding="utf-8") as handle:
            handle.write(head + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
