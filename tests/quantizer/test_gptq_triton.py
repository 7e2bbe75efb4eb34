"""The Triton GPTQ loop: interp_gptq_triton_cases.py runs the kernel under TRITON_INTERPRET=1 in a fresh
interpreter (triton decides between compiling and interpreting when a kernel is decorated, and other
tests of the session may already have imported triton in compile mode). Here, in this process: which
loop `gptq_quantize` picks, and the options."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantizer import gptq as gptq_mod
from quantizer.gptq import GPTQOptions, gptq_quantize
from quantizer.grid import GridSpec

CASES = Path(__file__).with_name("interp_gptq_triton_cases.py")
REPO = Path(__file__).resolve().parents[2]


def test_triton_gptq_loop_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("GPTQ_LOOP", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = f"exit status {result.returncode}\n" + result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 8, summary  # every case really ran


def test_cpu_weights_take_the_torch_loop(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("the Triton loop ran on CPU tensors")

    from quantizer import gptq_triton
    monkeypatch.setattr(gptq_triton, "run_segment", refuse)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(16, 40, generator=gen)
    X = torch.randn(100, 40, generator=gen)
    q = gptq_quantize(W, X.T @ X, GridSpec(bits=4, group_size=16), GPTQOptions())
    assert q.codes.shape == (16, 40)


def test_loop_choice(monkeypatch):
    w = torch.zeros(2, 2)
    assert not gptq_mod._use_triton(GPTQOptions(), w)               # auto on CPU: torch
    assert not gptq_mod._use_triton(GPTQOptions(loop="torch"), w)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        gptq_mod._use_triton(GPTQOptions(loop="triton"), w)           # compiled Triton needs CUDA tensors
    with pytest.raises(ValueError, match="loop"):
        GPTQOptions(loop="numba")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("act,static,group", [(False, False, 128), (True, False, 128), (True, True, 128),
                                              (False, False, 32), (True, False, -1)])
def test_cuda_kernel_matches_the_torch_loop_on_the_gpu(act, static, group):
    """Compiled kernel (div.rn, no FMA contraction, magic-number rounding) against the torch loop on
    the same GPU, at a shape with several blocks and a short last one."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, k = 512, 1000
    W = (torch.randn(n, k, generator=gen, device="cuda") * 0.02).half().float()
    X = torch.randn(4096, k, generator=gen, device="cuda").half()
    hess = gptq_mod.Hessian(k, "cuda")
    hess.add(X)
    spec = GridSpec(bits=4, group_size=group, sym=False)
    ref = gptq_quantize(W, hess.H, spec, GPTQOptions(act_order=act, static_groups=static, loop="torch"))
    got = gptq_quantize(W, hess.H, spec, GPTQOptions(act_order=act, static_groups=static, loop="auto"))
    assert (got.codes == ref.codes).float().mean().item() >= 0.999
    assert torch.equal(got.scales, ref.scales) and torch.equal(got.zeros, ref.zeros)
    assert float((got.weight - ref.weight).norm() / ref.weight.norm()) < 1e-4
    assert got.loss == pytest.approx(ref.loss, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_hessian_tf32_is_exact_on_16_bit_inputs():
    """fp16 inputs through TF32 tensor cores against a float64 reference: only fp32 accumulation error."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 2048, 512, generator=gen, device="cuda").half()
    hess = gptq_mod.Hessian(512, "cuda")
    before = torch.backends.cuda.matmul.allow_tf32
    for part in x:
        hess.add(part)
    assert torch.backends.cuda.matmul.allow_tf32 == before  # scoped to the accumulation
    xd = x.reshape(-1, 512).double()
    ref = 2 * xd.T @ xd / xd.shape[0]
    assert float((hess.H.double() - ref).abs().max() / ref.abs().max()) < 1e-5
