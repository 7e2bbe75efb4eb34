"""Load benchmark of the OpenAI-compatible API: N streaming requests at once against a real server on
loopback, versus the same requests sent one after another (the baseline of the same run).

    python -m bench.api_load --backend llama.cpp --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --requests 16 --max-tokens 16 [--record]

Reports throughput (generated tokens/s, requests/s), time to first token and request latency
percentiles for both runs, and the ratio concurrent / sequential. One model serves one request at a
time (fair FIFO queue), so the throughput ratio shows the queue's overhead (1.0 = none) while the
latency columns show what waiting in line costs each client.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO / "bench" / "RESULTS.md"
WORDS = ("apple", "river", "tiger", "violin", "castle", "pepper", "rocket", "garden",
         "silver", "dragon", "mountain", "coffee", "window", "planet", "thunder", "orange")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="llama.cpp", help="engine to load the model with")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="model under the models folder")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="backend load option")
    parser.add_argument("--requests", type=int, default=16, help="requests in the concurrent burst (default 16)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--record", action="store_true", help=f"append the result rows to {RESULTS_MD}")
    return parser.parse_args(argv)


def start_server(ctx):
    """The /v1 app under uvicorn on a free loopback port, in a thread of this process."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from webui.api import create_api_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = Starlette(routes=[Mount("/v1", app=create_api_app(ctx))])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise SystemExit("the API server did not start")
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def one_request(client, model: str, i: int, max_tokens: int) -> dict:
    word = WORDS[i % len(WORDS)]
    started = time.perf_counter()
    stream = client.completions.create(model=model, prompt=f"The password is {word}. I repeat, the password is",
                                       temperature=0, max_tokens=max_tokens, stream=True,
                                       stream_options={"include_usage": True})
    first, tokens = None, 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first if first is not None else time.perf_counter() - started,
            "latency": time.perf_counter() - started, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_burst(client, model: str, n: int, max_tokens: int, concurrency: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(client, model, i, max_tokens), range(n)))
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    out = {"concurrency": concurrency, "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "req_s": n / wall}
    for key in ("ttft", "latency"):
        for q in (0.5, 0.9, 0.99):
            out[f"{key}_p{int(q * 100)}"] = percentile([r[key] for r in results], q)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import psutil

    from backends.process_memory import resident_mb
    from openai import OpenAI
    from webui.context import AppContext
    import tempfile

    options = dict(o.split("=", 1) for o in args.option)
    ctx = AppContext.create(models_dir=args.models_dir, data_dir=Path(tempfile.mkdtemp(prefix="api-bench-")))
    model = ctx.manager.load(args.model, args.backend, options)
    server, base_url = start_server(ctx)
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    one_request(client, model, 0, 2)                       # warm-up
    rss_before = resident_mb()
    sequential = run_burst(client, model, args.requests, args.max_tokens, 1)
    concurrent = run_burst(client, model, args.requests, args.max_tokens, args.requests)
    rss_after = resident_mb()
    server.should_exit = True
    ctx.manager.unload_all()

    header = ("| date | device | backend | model | run | requests x max_tokens | tok/s | req/s | TTFT p50/p90/p99 s "
              "| latency p50/p90/p99 s | tok/s vs sequential |")
    rows = []
    device = f"{platform.machine()} CPU x{psutil.cpu_count()}"
    for name, r in (("sequential (baseline)", sequential), (f"{args.requests} concurrent", concurrent)):
        rows.append(f"| {time.strftime('%Y-%m-%d')} | {device} | {args.backend} | {args.model} | {name} | "
                    f"{args.requests} x {args.max_tokens} | {r['tok_s']:.1f} | {r['req_s']:.2f} | "
                    f"{r['ttft_p50']:.2f} / {r['ttft_p90']:.2f} / {r['ttft_p99']:.2f} | "
                    f"{r['latency_p50']:.2f} / {r['latency_p90']:.2f} / {r['latency_p99']:.2f} | "
                    f"{r['tok_s'] / sequential['tok_s']:.2f} |")
    command = "python -m bench.api_load " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(header)
    print("|" + "---|" * 11)
    print("\n".join(rows))
    print(f"\nRSS {rss_before:.0f} MB before the runs, {rss_after:.0f} MB after; command: {command}")
    if args.record:
        load = ", ".join(f"{x:.1f}" for x in psutil.getloadavg())
        with open(RESULTS_MD, "a", encoding="utf-8") as out:
            out.write(f"\n`{command}`: RSS {rss_before:.0f} -> {rss_after:.0f} MB, load average {load}\n\n")
            out.write(header + "\n|" + "---|" * 11 + "\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
