"""Hardware counters of the GPTQ kernels (Nsight Compute), to find what bounds a kernel that neither
instruction counts nor memory latency explain (BENCH.md section 1, bench/RESULTS.md).

    python -m bench.ncu_profile --cases 8192x28672:4g128:16:7,4096x11008:4g128:1:4 --picks /tmp/picks.json --pick-only
    ncu --clock-control none --profile-from-start off --set full -o /tmp/prof \\
        python -m bench.ncu_profile --cases 8192x28672:4g128:16:7,4096x11008:4g128:1:4 --picks /tmp/picks.json
    python -m bench.ncu_profile --summarize /tmp/prof.ncu-rep > summary.txt

Each case is SHAPE:CASE:M:MODE (CASE as in bench.kernels). The tuner picks the config among that mode's
candidates: with --pick-only outside ncu, written to --picks, because under ncu every launch is slowed and
its picks are not the ones a user gets (2026-12-03: a 12 us kernel timed 66 us there, and 2 of 3 picks
changed). The profiling run reads the picks (or tunes itself when the file is missing), then runs each
config `--launches` times over cold weight copies inside cudaProfilerStart/Stop, so ncu (with
--profile-from-start off) sees only those.
`--summarize` reads a report with ncu's CLI and prints, per kernel: duration, DRAM / L2 / L1 / SM
throughput, occupancy, issue rate and the warp stall reasons, largest first. `--sources` reads ncu's
per-instruction page of one kernel (`ncu --import R --page source --csv --print-source sass ...`) and
prints where its stall samples sit: before, in and after its K loop, and the instructions holding most.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# metric name (ncu raw page) -> label; the stall reasons are found by prefix
METRICS = {
    "gpu__time_duration.sum": "duration",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM %",
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": "DRAM %",
    "dram__bytes_read.sum": "DRAM bytes read",
    "lts__t_bytes.sum": "L2 bytes",
    "lts__throughput.avg.pct_of_peak_sustained_elapsed": "L2 %",
    "l1tex__throughput.avg.pct_of_peak_sustained_active": "L1 %",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM %",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved occupancy %",
    "launch__occupancy_limit_registers": "blocks/SM (registers)",
    "launch__occupancy_limit_shared_mem": "blocks/SM (shared)",
    "launch__registers_per_thread": "registers",
    "launch__grid_size": "grid",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue active %",
    "smsp__warps_eligible.avg.per_cycle_active": "eligible warps/cycle",
    "smsp__average_warp_latency_per_inst_issued.ratio": "cycles per issue (per warp)",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "tensor pipe %",
}
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="8192x28672:4g128:16:7")
    ap.add_argument("--launches", type=int, default=2)
    ap.add_argument("--picks", type=Path, help="JSON of each case's config: written with --pick-only, else read")
    ap.add_argument("--pick-only", action="store_true", help="tune each case, write --picks and stop")
    ap.add_argument("--summarize", metavar="REPORT", help="print the summary of an .ncu-rep file and exit")
    ap.add_argument("--sources", nargs="+", type=Path, metavar="CSV",
                    help="print where the stall samples of ncu's source pages sit, and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.sources:
        for page in args.sources:
            print(f"== {page}\n{summary_of_source_csv(page.read_text())}")
        return 0
    if args.pick_only and not args.picks:
        sys.exit("--pick-only writes its picks to --picks FILE")
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench.ncu_profile needs a CUDA GPU")
    from dataclasses import asdict
    from backends.gptq.kernel_runtime import GemmConfig, KernelRuntime
    from backends.gptq.timing import cold_copies
    from bench.kernels import CASES, random_layer
    picks = json.loads(args.picks.read_text()) if args.picks and args.picks.is_file() and not args.pick_only else {}
    for i, spec in enumerate(args.cases.split(",")):
        shape, case, m, mode = spec.split(":")
        K, N = map(int, shape.split("x"))
        bits, gs, act = CASES[case]
        _, layer = random_layer(K, N, bits, gs, act, seed=i)
        runtime = KernelRuntime(tune=True, modes=(int(mode),))
        x = torch.randn(int(m), K, device="cuda", dtype=torch.float16)
        if spec in picks:
            cfg = GemmConfig(**picks[spec])
            print(f"{spec}: {cfg} (from {args.picks})", flush=True)
        else:
            cfg, ms = runtime.fastest(x, layer, runtime.candidates(x.shape[0], layer, x.device, x.dtype))
            picks[spec] = asdict(cfg)
            print(f"{spec}: {ms * 1e3:.1f} us (graph replays, cold copies)  {cfg}", flush=True)
        if args.pick_only:
            continue
        copies = cold_copies(layer, "cuda")
        runtime.run(x, layer, cfg)  # compiles and sizes the split scratch outside the profiled range
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for j in range(args.launches):
            runtime.run(x, copies[(j + 1) % len(copies)], cfg)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        del copies, layer
        torch.cuda.empty_cache()
    if args.pick_only:
        args.picks.write_text(json.dumps(picks, indent=1))
    return 0


def summarize(report: str) -> str:
    """The summary of an .ncu-rep file (read with ncu's CLI, which must be on PATH)."""
    try:
        raw = subprocess.run(["ncu", "--import", report, "--page", "raw", "--csv"], capture_output=True,
                             text=True, check=True).stdout
    except FileNotFoundError:
        sys.exit("bench.ncu_profile --summarize needs Nsight Compute's ncu on PATH")
    except subprocess.CalledProcessError as exc:
        sys.exit(f"ncu could not read {report}: {exc.stderr.strip()[-500:]}")
    return summary_of_raw_csv(raw)


def summary_of_raw_csv(raw: str) -> str:
    """Per kernel of ncu's raw page (CSV: a header row, a units row, a row per kernel): the METRICS it has
    and the stall reasons, largest first."""
    rows = list(csv.reader(io.StringIO(raw)))
    if len(rows) < 3:
        return "no kernel in the report (was the profiled range empty?)"
    header, units, data = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    lines = []
    for row in data:
        name = row[col["Kernel Name"]] if "Kernel Name" in col else "?"
        lines.append(f"== {name[:60]}  (grid {row[col['launch__grid_size']] if 'launch__grid_size' in col else '?'}, "
                     f"block {row[col['launch__block_size']] if 'launch__block_size' in col else '?'})")
        for metric, label in METRICS.items():
            if metric in col:
                lines.append(f"   {label:32s} {row[col[metric]]} {units[col[metric]]}")
        stalls = []
        for metric, i in col.items():
            if metric.startswith(STALL_PREFIX) and metric.endswith(STALL_SUFFIX) and "_not_issued" not in metric:
                try:
                    stalls.append((float(row[i].replace(",", "")), metric[len(STALL_PREFIX):-len(STALL_SUFFIX)]))
                except ValueError:
                    pass
        stalls.sort(reverse=True)
        lines.append("   stalls (cycles per issued instruction): "
                     + ", ".join(f"{reason} {value:.2f}" for value, reason in stalls[:9]))
    return "\n".join(lines)



def summary_of_source_csv(raw: str, top: int = 8) -> str:
    """Where one kernel's warp stall samples sit, from ncu's source page (CSV: a "Kernel Name" row, a
    header row, a row per SASS instruction): the share before, in and after its longest loop (the K loop,
    bench.kernel_sass.longest_loop), then the `top` instructions holding most, each with its main reason."""
    from bench.kernel_sass import longest_loop
    rows = list(csv.reader(io.StringIO(raw)))
    header = next((r for r in rows if "Address" in r and "Source" in r), None)
    if header is None:
        return "not an ncu source page (no Address and Source columns)"
    col = {name: i for i, name in enumerate(header)}
    data = [r for r in rows[rows.index(header) + 1:] if len(r) == len(header)]
    samples = [int(r[col["Warp Stall Sampling (All Samples)"]] or 0) for r in data]
    total = sum(samples)
    if not total:
        return "no stall samples"
    start, end = longest_loop([(int(r[col["Address"]], 16), r[col["Source"]].strip()) for r in data])
    share = lambda a, b: 100 * sum(samples[a:b]) / total
    lines = [f"   {total} samples: {share(0, start):.0f}% before the K loop, {share(start, end):.0f}% in it "
             f"({end - start} instructions), {share(end, len(data)):.0f}% after"]
    reasons = [name for name in header if name.startswith("stall_") and "(Not Issued)" not in name]
    for i in sorted(range(len(data)), key=lambda i: -samples[i])[:top]:
        main = max(reasons, key=lambda name: int(data[i][col[name]] or 0))
        where = "loop" if start <= i < end else "before" if i < start else "after"
        lines.append(f"   {100 * samples[i] / total:5.1f}%  {main[len('stall_'):]:<14s} {where:<6s} "
                     f"{data[i][col['Source']].strip()}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
