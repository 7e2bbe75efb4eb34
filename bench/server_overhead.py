"""What the web server itself costs: its CPU while idle, and the speed of a reply through the API, with
Gradio's own queue polling (every 1 ms for events, 10 ms for progress) against ours (`webui.app.QUEUE_POLL_S`,
`PROGRESS_POLL_S`), each as a real `python -m webui` process, alternated so drift hits both alike.

    python -m bench.server_overhead [--model SmolLM2-135M-Instruct] [--rounds 2] [--idle-s 20]
        [--requests 3] [--max-tokens 150] [--record]

Idle CPU is the server process's user + system seconds over --idle-s with no page open; reply time is the
median wall time of --requests greedy chat completions of --max-tokens tokens (nothing else running).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO / "bench" / "RESULTS.md"
# the server under test, its polling set from the command line (0.001 / 0.01 keep Gradio's defaults:
# relax_queue_polling never shortens an interval)
LAUNCHER = ("import sys, webui.app as app\n"
            "app.QUEUE_POLL_S, app.PROGRESS_POLL_S = float(sys.argv[1]), float(sys.argv[2])\n"
            "raise SystemExit(app.main(sys.argv[3:]))\n")
CONFIGS = (("gradio's polling (1 ms / 10 ms)", 0.001, 0.01), ("ours", None, None))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.server_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model under the models folder")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--rounds", type=int, default=2, help="times each configuration runs, alternated")
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--record", action="store_true", help=f"append the table to {RESULTS_MD}")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def start(args, queue_s: float, progress_s: float, data_dir: Path):
    port = free_port()
    cmd = [sys.executable, "-c", LAUNCHER, str(queue_s), str(progress_s), "--port", str(port), "--model", args.model,
           "--backend", args.backend, "--models-dir", str(args.models_dir), "--data-dir", str(data_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            models = [m["id"] for m in _get(f"{base}/models")["data"]]
            if models:
                return proc, base, models[0]
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up in 300 s")


def cpu_seconds(pid: int) -> float:
    import psutil
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def reply_seconds(base: str, model: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}).encode()
    request = urllib.request.Request(f"{base}/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        usage = json.loads(response.read())["usage"]
    return time.perf_counter() - started, usage["completion_tokens"]


def measure(args, queue_s, progress_s, data_dir: Path) -> dict:
    from webui.app import PROGRESS_POLL_S, QUEUE_POLL_S
    queue_s, progress_s = queue_s or QUEUE_POLL_S, progress_s or PROGRESS_POLL_S
    proc, base, model = start(args, queue_s, progress_s, data_dir)
    try:
        reply_seconds(base, model, 8)                          # warm-up
        time.sleep(2)
        before = cpu_seconds(proc.pid)
        time.sleep(args.idle_s)
        idle = (cpu_seconds(proc.pid) - before) / args.idle_s
        runs = [reply_seconds(base, model, args.max_tokens) for _ in range(args.requests)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"idle_core_pct": 100 * idle, "reply_s": statistics.median(s for s, _ in runs),
            "tokens": runs[0][1]}


def main(argv=None) -> int:
    import tempfile
    args = parse_args(argv)
    rows = {name: [] for name, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="server-overhead-") as tmp:
        for round_ in range(args.rounds):
            for name, queue_s, progress_s in CONFIGS:
                result = measure(args, queue_s, progress_s, Path(tmp))
                rows[name].append(result)
                print(json.dumps({"round": round_ + 1, "config": name, **result}), flush=True)
    base_name, ours_name = CONFIGS[0][0], CONFIGS[1][0]
    base_reply = statistics.median(r["reply_s"] for r in rows[base_name])
    lines = ["| polling | idle CPU, % of a core (each round) | reply s, median (each round) | reply time vs gradio's |",
             "| --- | --- | --- | --- |"]
    for name, results in rows.items():
        reply = statistics.median(r["reply_s"] for r in results)
        idle = " / ".join(f"{r['idle_core_pct']:.2f}" for r in results)
        each = " / ".join(f"{r['reply_s']:.2f}" for r in results)
        lines.append(f"| {name} | {idle} | {reply:.2f} ({each}) | {reply / base_reply:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        command = "python -m bench.server_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"\n### Server overhead ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                  f"CPU {platform.machine()} x{os.cpu_count()}, {args.backend} {args.model})\n"
                  f"Command: `{command}`; {args.requests} replies of {rows[ours_name][0]['tokens']} tokens per round, "
                  f"{args.idle_s:.0f} s idle.\n\n")
        with open(RESULTS_MD, "a", encoding="utf-8") as fh:
            fh.write(header + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
