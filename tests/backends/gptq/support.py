"""Helpers of the gptq backend's tests: running a cases file in a fresh interpreter under TRITON_INTERPRET=1, a
CPU stand-in for a captured CUDA graph, a random packed layer with its float64 reference, the float64 check of a
fused-kernel config on CUDA, and rewriting a checkpoint's quantize config."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[3]


def fields3_codes(words):
    """Codes [K, N] (int64) of 3-bit words in the fields order: word_order.fields3 undone, bit by bit from
    its own placement table (fields3_place)."""
    import torch

    from backends.gptq.word_order import fields3_place
    w = (words.to(torch.int64) & 0xFFFFFFFF).view(-1, 3, words.shape[1])
    codes = torch.zeros(w.shape[0], 32, w.shape[2], dtype=torch.int64, device=words.device)
    for j in range(32):
        for word, bit, value_bit in fields3_place(j):
            codes[:, j] |= ((w[:, word] >> bit) & 1) << value_bit
    return codes.view(-1, w.shape[2])


def random_packed_layer(bits: int, group_size: int, K: int, N: int, seed: int, act: bool = False,
                        checkpoint_format: str = "gptq_v2"):
    """A random GPTQ layer as a checkpoint stores it, (qweight, qzeros, scales, g_idx), with its weights
    dequantized in float64 by format.dequantize: the reference every kernel is checked against. act: g_idx
    shuffled (act-order)."""
    import torch

    from backends.gptq import format as fmt
    gen = torch.Generator().manual_seed(seed)
    G = fmt.num_groups(K, group_size)
    codes = torch.randint(0, 2**bits, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (G, N), generator=gen, dtype=torch.int32)
    scales = (torch.rand(G, N, generator=gen) * 0.05 + 0.005).half()
    g_idx = fmt.default_g_idx(K, group_size)
    if act:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    qw, qz = fmt.pack_qweight(codes, bits), fmt.pack_qzeros(zeros, bits, checkpoint_format)
    ref_w = fmt.dequantize(qw, qz, scales, g_idx, bits, checkpoint_format, dtype=torch.float64)
    return (qw, qz, scales, g_idx), ref_w


def set_quantize_config(folder: Path, change) -> None:
    """Apply `change` (a function editing a dict) to a checkpoint's quantize config in both places it is
    written: quantize_config.json and config.json's quantization_config."""
    import json
    qc = json.loads((folder / "quantize_config.json").read_text())
    change(qc)
    (folder / "quantize_config.json").write_text(json.dumps(qc))
    base = json.loads((folder / "config.json").read_text())
    base["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(base))


def run_under_interpreter(cases: Path, min_passed: int) -> None:
    """Run a pytest file in a fresh interpreter with TRITON_INTERPRET=1: triton decides between
    compiling and interpreting when a kernel is first imported, and other tests of the session may
    already have imported it in compile mode. Every case must pass, none skipped."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    tail = f"exit status {result.returncode}\n" + result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= min_passed, summary  # every case really ran


class ReplayByRerun:
    """CPU stand-in for CudaGraphStep (which needs a GPU): the same calls in the same order."""

    def __init__(self, warm_up, fn, device):
        warm_up()
        self.fn = fn
        self.replays = 0

    def replay(self):
        self.replays += 1
        return self.fn()


class CaptureLog(list):
    """A step_capture that keeps every ReplayByRerun it makes, so a test can count captures and replays."""

    def __call__(self, warm_up, fn, device):
        self.append(ReplayByRerun(warm_up, fn, device))
        return self[-1]


def precompile_fused(layer, configs, row_counts, bias, scratch) -> None:
    """Compile every (config, row count, with and without bias) launch side by side before the checks run
    them one by one (parallel_compile: a GPU machine's cores instead of one compile at a time)."""
    import functools

    import torch

    from backends.gptq import kernel_runtime as kr
    from backends.gptq.parallel_compile import compile_all
    calls = []
    for cfg in configs:
        for M in row_counts(cfg):
            x = torch.zeros(M, layer.K, device=bias.device, dtype=torch.float16)
            calls += [functools.partial(kr.launch_fused, x, layer, cfg, bias=b, scratch=scratch, compile_only=True)
                      for b in (None, bias)]
    compile_all(calls)


def assert_fused_matches_float64(layer, ref, cfg, row_counts, bias, scratch, generator, shape_x=None, tol=2e-3,
                                 pdl=False):
    """Launch `cfg` (kernel_runtime.launch_fused) for each row count, without and with `bias`, into an output
    poisoned with NaN: every output written, relative error against x @ ref in float64 below `tol`.
    shape_x(x) may rewrite each fresh random x first (small values, outliers). pdl: as programmatic
    dependent launches."""
    import torch

    from backends.gptq import kernel_runtime as kr
    K, N = ref.shape
    for M in row_counts:
        x = torch.randn(M, K, generator=generator, device=ref.device).half()
        if shape_x is not None:
            x = shape_x(x)
        for with_bias in (False, True):
            out = torch.full((M, N), float("nan"), device=ref.device, dtype=torch.float16)
            y = kr.launch_fused(x, layer, cfg, out=out, bias=bias if with_bias else None, scratch=scratch, pdl=pdl)
            want = x.double() @ ref + (bias.double() if with_bias else 0)
            assert not torch.isnan(y).any(), f"unwritten outputs with {cfg}, M={M}"
            err = float((y.double() - want).norm() / want.norm())
            assert err < tol, f"{cfg} M={M} bias={with_bias}: rel err {err:.2e}"
