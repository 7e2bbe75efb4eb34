"""Static look at the M = 1 GPTQ kernels without a GPU: compile them for a CUDA target (sm_90 by default)
with Triton's own ptxas, disassemble, and count the instructions of each kernel's main loop per weight.

    python -m bench.kernel_sass [--arch 90] [--block-n 256] [--warps 4]

Why: at batch 1 a 4-bit kernel must retire its instructions faster than memory delivers weights
(an H100 at 80 % of its copy bandwidth brings ~4.8e12 4-bit weights/s; its SMs issue ~3.0e13 thread
instructions/s), so instructions per weight in the loop decide whether a kernel can be bandwidth bound.
This is a count, not a timing: bench/kernels.py measures on the GPU. Needs triton (no CUDA driver).
"""
from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

POINTERS = {"x_ptr": "*fp16", "xp_ptr": "*i32", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
            "perm_ptr": "*i32", "out_ptr": "*fp16", "bias_ptr": "*fp16", "ws_ptr": "*fp32", "ticket_ptr": "*i32"}
ALIGNED = ("N", "K", "Kw", "group_size")  # what Triton specializes at launch for the usual shapes


def compile_cubin(kernel, constexprs: dict, arch: int, warps: int, types: dict | None = None,
                  options: dict | None = None) -> bytes:
    """The kernel compiled for sm_<arch> by Triton's own toolchain (no GPU or driver needed); `types`
    overrides the argument types (pointers of POINTERS, i32 otherwise); `options` adds compile options
    beyond the warps (a launch's `maxnreg`)."""
    return compile_asm(kernel, constexprs, arch, warps, types, options)["cubin"]


def compile_asm(kernel, constexprs: dict, arch: int, warps: int, types: dict | None = None,
                options: dict | None = None) -> dict:
    """Every stage compile_cubin produces, by name ("ptx", "cubin", ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    params = inspect.signature(kernel.fn).parameters
    names = list(params)
    constexprs = {**{n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty},
                  **constexprs}  # defaulted parameters are constexprs (PDL, ROTARY): as a launch specializes them
    signature = {n: (types or {}).get(n, POINTERS.get(n, "i32")) for n in names}
    signature.update({k: "constexpr" for k in constexprs})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n.endswith("_ptr") or n in ALIGNED or n.startswith("stride")}
    source = ASTSource
    if type(kernel).__name__ == "GluonJITFunction":  # Gluon kernels (gluon_mma.py) have their own source type
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=kernel, signature=signature, attrs=attrs,
                 constexprs={(names.index(k),): v for k, v in constexprs.items()})
    from backends.gptq.parallel_compile import COMPILE_OPTIONS  # as the backend launches them
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, **COMPILE_OPTIONS, **(options or {})}).asm


def main_loop(sass: str) -> list[str]:
    """Instructions of the longest backward-branch loop (the K loop) of cuobjdump's SASS listing."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    start, end = longest_loop(ins)
    return [text for _, text in ins[start:end]]


def longest_loop(ins: list[tuple[int, str]]) -> tuple[int, int]:
    """(first, past-last) index of the longest backward-branch loop in (address, instruction) pairs sorted
    by address; (0, 0) without one. Also reads Nsight Compute's source page (bench.ncu_profile)."""
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    best = (0, 0)
    for i, (addr, text) in enumerate(ins):
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text) if "BRA" in text else None
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            span = (index[int(target.group(1), 16)], i + 1)
            best = max(best, span, key=lambda s: s[1] - s[0])
    return best


def mnemonic(text: str) -> str:
    """The instruction's name with its modifiers (LDG.E.64), past any predicate."""
    parts = text.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def opcode(text: str) -> str:
    return mnemonic(text).split(".")[0]


def _cuobjdump(kernel, constexprs: dict, arch: int, warps: int, flag: str, options: dict | None = None) -> str:
    """cuobjdump's output with `flag` (-sass, -res-usage) for the kernel compiled for sm_<arch>."""
    import triton
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compile_cubin(kernel, constexprs, arch, warps, options=options))
        return subprocess.run([str(cuobjdump), flag, str(cubin)], capture_output=True, text=True).stdout


def kernel_sass(kernel, constexprs: dict, arch: int = 90, warps: int = 4, options: dict | None = None) -> str:
    """cuobjdump's SASS listing of the kernel compiled for sm_<arch> (Triton's ptxas and cuobjdump)."""
    return _cuobjdump(kernel, constexprs, arch, warps, "-sass", options)


def loop_body(kernel, constexprs: dict, arch: int = 90, warps: int = 4, options: dict | None = None) -> list[str]:
    """SASS instructions of the kernel's K loop, compiled for sm_<arch>."""
    return main_loop(kernel_sass(kernel, constexprs, arch, warps, options))


def resources(kernel, constexprs: dict, arch: int = 90, warps: int = 4, options: dict | None = None) -> dict:
    """What the compiled kernel needs per thread and block, from cuobjdump -res-usage: {"REG": registers,
    "STACK": bytes of local memory (spills), "SHARED": ..., ...}."""
    text = _cuobjdump(kernel, constexprs, arch, warps, "-res-usage", options)
    return {name: int(value) for name, value in re.findall(r"\b([A-Z]+):(\d+)", text)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--block-n", type=int, default=256)
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args(argv)
    from backends.gptq import triton_kernels as tk
    threads = 32 * args.warps
    cases = []
    for bits in (4, 2, 3, 8):
        vpb = 32 if bits == 3 else 32 // bits
        kb = 128 // vpb if bits != 3 else 4
        common = dict(KB=kb, BLOCK_N=args.block_n, HAS_PERM=False, SPLIT=True, HAS_BIAS=False)
        cases.append((f"{bits}-bit mode 3 (unpack, fp32 fma)", tk.gptq_gemv_kernel,
                      dict(common, BITS=bits, VPB=vpb, INTERLEAVED=bits in (2, 4)), kb * vpb))
        gemm = dict(common, BITS=bits, VPB=vpb, BLOCK_M=1, INTERLEAVED=bits in (2, 4))
        cases.append((f"{bits}-bit mode 0 (3-D unpack)", tk.gptq_gemm_kernel, dict(gemm, MODE=0), kb * vpb))
        cases.append((f"{bits}-bit mode 2 (unrolled slots)", tk.gptq_gemm_kernel, dict(gemm, MODE=2), kb * vpb))
        if bits != 8:
            for even in (False, True):
                cases.append((f"{bits}-bit mode 4 (half2{', planes' if bits == 3 else ''}"
                              f"{', whole tiles' if even else ''})", tk.gptq_gemv_h2_kernel,
                              dict(common, BITS=bits, USE_ASM=True, EVEN=even), kb * vpb))
    # 16 rows (M = 16): the unrolled kernel on tensor cores against the half2 tensor-core kernel
    m16 = dict(KB=16, BLOCK_N=args.block_n, HAS_PERM=False, SPLIT=True, HAS_BIAS=False, BLOCK_M=16)
    cases.append(("4-bit mode 2, 16 rows (unrolled slots, tensor cores)", tk.gptq_gemm_kernel,
                  dict(m16, BITS=4, VPB=8, INTERLEAVED=True, MODE=2), 128))
    for bits, kb in ((4, 16), (2, 8), (3, 4)):
        for even in (False, True):
            cases.append((f"{bits}-bit mode 5, 16 rows (half2 unpack, tensor cores{', whole tiles' if even else ''})",
                          tk.gptq_gemm_h2_kernel, dict(m16, KB=kb, BITS=bits, USE_ASM=True, EVEN=even), 128))
    print("| kernel | weights per thread per tile | loop instructions per thread | per weight | top opcodes |")
    print("| --- | --- | --- | --- | --- |")
    for title, kernel, const, block_k in cases:
        body = loop_body(kernel, const, args.arch, args.warps)
        weights = block_k * args.block_n / threads
        top = ", ".join(f"{op} {n}" for op, n in Counter(map(opcode, body)).most_common(6))
        print(f"| {title} | {weights:.0f} | {len(body)} | {len(body) / weights:.2f} | {top} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
