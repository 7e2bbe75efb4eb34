"""What a loglikelihood request costs through the API, per engine, on a real `python -m webui` server:
lm-evaluation-harness's shape (token-id prompt, echo, logprobs 1, max_tokens 1, temperature 0) against
the floor measured in the same run (the prompt scored alone: echo, max_tokens 0) and against a greedy
two-token reply with log-probs (generated, then scored: what every log-prob request cost before a
one-token greedy reply came from the scoring pass); and a 16-token reply without and with log-probs
(each token's from the step that drew it: the two should cost the same).

    python -m bench.api_scoring [--tokens 512] [--requests 6] [--record]

Prompts: consecutive windows of WikiText-2 test (the shared data folder, as `quantizer eval` reads it). Prints median seconds per request and
the ratios to the floor; --record appends them to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.provenance import tree_commit
from bench.scoring_speed import wikitext_or_none
from bench.server_overhead import REPO, RESULTS_MD, start

ENGINES = (("transformers fp32", "SmolLM2-135M-Instruct", "transformers"),
           ("llama.cpp Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama.cpp"))
SHAPES = (("score only (echo, max_tokens 0)", {"echo": True, "max_tokens": 0, "logprobs": 1}),
          ("lm-eval (echo, max_tokens 1, logprobs 1)", {"echo": True, "max_tokens": 1, "logprobs": 1}),
          ("2 generated + scored (logprobs 1)", {"echo": True, "max_tokens": 2, "logprobs": 1}),
          ("16 generated", {"max_tokens": 16}),
          ("16 generated, logprobs 5", {"max_tokens": 16, "logprobs": 5}))


def post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def measure(name: str, engine: str, text: str, tokens: int, requests: int, data_dir: Path) -> dict:
    from webui.app import PROGRESS_POLL_S, QUEUE_POLL_S
    server = argparse.Namespace(model=name, backend=engine, models_dir=REPO / "models")
    proc, base, model = start(server, QUEUE_POLL_S, PROGRESS_POLL_S, data_dir)     # base ends in /v1
    try:
        ids = post(base, "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})["tokens"]
        prompts = [ids[i * tokens:(i + 1) * tokens] for i in range(requests)]
        times = {label: [] for label, _ in SHAPES}
        post(base, "/completions", {"model": model, "prompt": prompts[0], **SHAPES[0][1]})     # warm-up
        for prompt in prompts:                       # the shapes alternate on each prompt: drift hits all alike
            for index, (label, fields) in enumerate(SHAPES):
                # shape i drops the prompt's first i tokens: llama.cpp reuses a cached prefix of the last
                # request's prompt, which would spare one shape the prompt's evaluation and not another
                started = time.perf_counter()
                post(base, "/completions", {"model": model, "prompt": prompt[index:], "temperature": 0, **fields})
                times[label].append(time.perf_counter() - started)
        return {label: statistics.median(values) for label, values in times.items()}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_scoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    text = wikitext_or_none(args.tokens * args.requests * 8)
    if text is None:
        return 2
    lines = ["| engine | " + " | ".join(label for label, _ in SHAPES) + " |", "|---|" + "---:|" * len(SHAPES)]
    with tempfile.TemporaryDirectory(prefix="api-scoring-") as tmp:
        for label, name, engine in ENGINES:
            result = measure(name, engine, text, args.tokens, args.requests, Path(tmp))
            floor = result[SHAPES[0][0]]
            lines.append(f"| {label} | " + " | ".join(f"{result[s]:.3f} s ({result[s] / floor:.2f}x)"
                                                       for s, _ in SHAPES) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.record:
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(RESULTS_MD, "a", encoding="utf-8") as handle:
            handle.write(f"\n## Loglikelihood requests through the API ({when}, {platform.machine()} CPU, "
                         f"commit {tree_commit()})\n\n`python -m bench.api_scoring --tokens {args.tokens} --requests "
                         f"{args.requests}` (median seconds per request of {args.tokens} tokens; ratio to scoring "
                         f"alone in the same run)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
