"""Where the time of the 1-16-row tensor-core kernel (mode 8, gluon_gemv.py) goes: a diagnostic for BENCH.md
section 1, as bench.m16_probe is for mode 5.

    python -m bench.mode8_probe [--cases 8192x28672:2g64:1,8192x28672:4g128:16] [--rounds 3]

For each case (K x N, bits and group, rows of x) it times, over cold weight copies as the tuner does, the
kernel as shipped and two altered copies at every mode-8 config the tuner offers there:
  - "loads only": every tile's words, x, scales and zeros are loaded as shipped (same layouts, pipeline
    form and cache hints) and folded into a checksum; no unpacking, no MMA (wrong result). What the
    memory side of the loop costs: the read floor of this kernel's loads.
  - "no zero points": the weights' MMA only, each tile's product added as it comes (wrong result): no
    all-ones MMA for sum(x), no scale or zero term, so no scale or zero loads either. What the unpack and
    the MMA cost on top of the loads.
The altered copies are gluon_gemv.py's own source with a few lines rewritten (`probe_source`), so they
follow every change to the kernel; a rewrite that no longer matches stops the probe with the line it
looked for. Baselines of the same run: the shipped tuner's pick over all modes, torch fp16 `x @ W` and a
plain read of the packed bytes. Needs CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = ("shipped", "loads only", "no zero points")

# (line in gluon_gemv.py, its replacement) per altered variant; each line must occur exactly once
_LOOP_HEAD = "        acc = gl.zeros([BLOCK_N, R], gl.float32, mma)\n        for t in range(t0, t_end):\n"
_FIRST_USE = ("            w_mma = gl.convert_layout(_mma_order(w, BLOCK_N, num_warps, LW), W_LAYOUT, "
              "assert_trivial=True)\n            if GROUPS == 2:\n")
_STORE = "        _store_columns(acc, out_ptr,"
_STORE_END = "                       num_warps, R, SPLIT, HAS_BIAS, OUT_LAYOUT)\n"
REWRITES = {
    "loads only": [
        (_LOOP_HEAD, "        acc = gl.zeros([BLOCK_N, R], gl.float32, mma)\n"
                     "        wx = gl.zeros([BLOCK_N, LW], gl.int32, LOAD_LAYOUT)\n"
                     "        xx = gl.zeros([BLOCK_K // 2, R], gl.int32, X_LAYOUT)\n"
                     "        sx = gl.zeros([BLOCK_N], gl.float32, COL_LAYOUT)\n"
                     "        for t in range(t0, t_end):\n"),
        (_FIRST_USE, "            w_mma = gl.convert_layout(_mma_order(w, BLOCK_N, num_warps, LW), W_LAYOUT, "
                     "assert_trivial=True)\n"
                     "            if True:  # probe: loads only\n"
                     "                wx = wx ^ w ^ wb ^ wh\n"
                     "                xx = xx ^ xp\n"
                     "                sx = sx + s.to(gl.float32) + z.to(gl.float32)\n"
                     "            elif GROUPS == 2:\n"),
        (_STORE, "        total = gl.sum(gl.sum(wx, 1), 0) + gl.sum(gl.sum(xx, 1), 0)\n"
                 "        gl.store(out_ptr + pid_n, total.to(gl.float32) + gl.sum(sx, 0))\n"
                 "        if False:\n"
                 "            _store_columns(acc, out_ptr,"),
        (_STORE_END, "                           num_warps, R, SPLIT, HAS_BIAS, OUT_LAYOUT)\n"),
    ],
    "no zero points": [
        ("        return s_mma.to(gl.float32)[:, None] * (part - z_mma.to(gl.float32)[:, None] * sums)\n",
         "        return part  # probe: no zero points (sums, scales and zeros unused, so never computed or loaded)\n"),
    ],
}


def probe_source(variant: str) -> str:
    """gluon_gemv.py's source with `variant`'s lines rewritten."""
    src = (REPO / "backends" / "gptq" / "gluon_gemv.py").read_text()
    for old, new in REWRITES[variant]:
        if src.count(old) != 1:
            raise SystemExit(f"bench.mode8_probe: gluon_gemv.py changed; this line is not there once:\n{old}")
        src = src.replace(old, new)
    return src


def probe_module(variant: str, folder: Path):
    """The altered kernel's module, imported from a file (Gluon reads a kernel's source from its file)."""
    path = folder / f"gluon_gemv_probe_{variant.replace(' ', '_')}.py"
    path.write_text(probe_source(variant))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def kernel_of(module):
    """Launches of mode 8 run `module`'s kernel inside the block (the runtime looks it up at each launch)."""
    from backends.gptq import gluon_gemv
    shipped = gluon_gemv.gptq_mma_t_kernel
    gluon_gemv.gptq_mma_t_kernel = module.gptq_mma_t_kernel if module is not None else shipped
    try:
        yield
    finally:
        gluon_gemv.gptq_mma_t_kernel = shipped


def parse_case(text: str):
    """'KxN:case:rows' (case as bench.kernels names them; mode 8's widths, without act-order) -> K, N, bits,
    group, rows."""
    from backends.gptq.gluon_gemv import BITS
    from bench.kernels import CASES, shape_case
    shape, case, rows = text.split(":")
    taken = [c for c, (bits, _, act) in CASES.items() if bits in BITS and not act]
    K, N, bits, group, _ = shape_case(f"{shape}:{case}", "bench.mode8_probe", taken)
    return K, N, bits, group, int(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="8192x28672:2g64:1,8192x28672:4g128:1,8192x28672:4g128:16")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds, variants alternating (best kept)")
    ap.add_argument("--top", type=int, default=6, help="configs printed per case")
    ap.add_argument("--variants", default=",".join(VARIANTS[1:]),
                    help="altered copies to time next to the shipped kernel (comma-separated)")
    args = ap.parse_args(argv)
    cases = [parse_case(case) for case in args.cases.split(",")]  # a bad name stops before any GPU work
    variants = ("shipped", *[v for v in args.variants.split(",") if v])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench.mode8_probe: unknown variant(s) {unknown} (of {', '.join(VARIANTS[1:])})")
    if not torch.cuda.is_available():
        sys.exit("bench.mode8_probe needs a CUDA GPU")
    from backends.gptq.kernel_runtime import GemmConfig, KernelRuntime
    from backends.gptq.timing import cold_copies, graph_time_ms
    from bench.gemv_sweep import cold_ms
    from bench.kernels import fp16_copies, random_layer, read_floor_ms
    from bench.provenance import tree_commit
    folder = Path(tempfile.mkdtemp(prefix="mode8_probe_"))
    modules = {"shipped": None, **{v: probe_module(v, folder) for v in variants[1:]}}
    print(f"{torch.cuda.get_device_name()}, commit {tree_commit()}", flush=True)
    for K, N, bits, group, rows in cases:
        _, layer = random_layer(K, N, bits, group, False, seed=K + N)
        x = torch.randn(rows, K, device="cuda", dtype=torch.float16)
        runtime = KernelRuntime(tune=True, modes=(8,))
        configs = [c for c in runtime.candidates(rows, layer, x.device, x.dtype) if c.mode == 8]
        reference = runtime.run(x, layer, GemmConfig(path="dequant")).float()
        copies = cold_copies(layer, "cuda")
        times = {}
        for _ in range(args.rounds):
            for variant in variants:
                with kernel_of(modules[variant]):
                    for cfg in configs:
                        y = runtime.run(x, layer, cfg).float()
                        if variant == "shipped" and float((y - reference).norm() / reference.norm()) > 1e-2:
                            raise SystemExit(f"wrong result at {cfg}")
                        times.setdefault((variant, cfg), []).append(cold_ms(runtime, x, copies, cfg) * 1e3)
        full = KernelRuntime(tune=True)
        pick, pick_ms = full.fastest(x, layer, full.candidates(rows, layer, x.device, x.dtype))
        dense = fp16_copies(K, N)
        fp16_us = graph_time_ms(lambda i: x @ dense[i % len(dense)], calls=max(8, len(dense))) * 1e3
        floor_us = read_floor_ms(layer.nbytes()) * 1e3
        best = {v: min(min(times[(v, c)]) for c in configs) for v in variants}
        print(f"\n== {K}x{N} {bits}-bit g{group}, {rows} row(s): {layer.nbytes() / 1e6:.1f} MB; read floor "
              f"{floor_us:.1f} us, torch fp16 {fp16_us:.1f} us; shipped tuner pick {pick_ms * 1e3:.1f} us "
              f"(mode {pick.mode}, {fp16_us / (pick_ms * 1e3):.2f}x fp16)", flush=True)
        print("  best of mode 8's configs: " + ", ".join(f"{v} {best[v]:.1f} us" for v in variants), flush=True)
        order = sorted(configs, key=lambda c: min(times[("shipped", c)]))
        for cfg in order[:args.top]:
            cells = "  ".join(f"{min(times[(v, cfg)]):6.1f}" for v in variants)
            print(f"  {cells}   bn{cfg.block_n} bk{cfg.block_k} split {cfg.split_k} warps {cfg.num_warps} "
                  f"form {cfg.num_stages}", flush=True)
        del copies, layer, dense
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
