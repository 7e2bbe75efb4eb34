"""Is the tensor-core kernel (mode 5) right at a given number of value blocks per tile? A correctness probe
of its compiled form, with and without its inline PTX, for kernel_runtime.MODE5_MIN_BLOCKS.

    python -m bench.mode5_blocks

Mode 5 called directly (the runtime's minimum lifted) at 2, 12 and 16 rows, splits 1, 2 and 4, on 2-, 3-
and 4-bit layers (3 bits in the planes order, as off Hopper) with tiles of two and of four value blocks,
each against a float64 reference of the dequantized weights. On an H100 and an H200 (triton 3.6, 2026-12-05)
every two-block tile was wrong (relative error 1.0-1.8) with or without the PTX, every four-block tile right.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backends.gptq import format as fmt  # noqa: E402
from backends.gptq import kernel_runtime as kr  # noqa: E402
from backends.gptq import quant_linear  # noqa: E402
from backends.gptq.word_order import values_per_block  # noqa: E402
from bench.kernels import random_layer, rel_err  # noqa: E402
from bench.provenance import tree_commit  # noqa: E402

CASES = ((2, 32, 32), (2, 64, 64), (2, 64, 32), (3, 64, 64), (3, 128, 128), (4, 32, 32), (4, 32, 16))  # bits, group, bk
ROWS_SPLITS = ((2, 1), (12, 1), (16, 1), (12, 2), (16, 4))


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.mode5_blocks needs a CUDA GPU", file=sys.stderr)
        return 1
    from backends.gptq import triton_kernels
    # (a one-shot process: these stay changed until it ends)
    quant_linear.fields3_for = lambda device: False  # 3 bits in the planes order: mode 5's (as off Hopper)
    kr.MODE5_MIN_BLOCKS = 1  # the probe runs the tiles the runtime refuses
    print(f"# mode 5 by value blocks per tile - {torch.cuda.get_device_name()} - commit {tree_commit()}")
    print("| bits | group | block_k | blocks | K x N | PTX | rows | split | relative error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for bits, gs, bk in CASES:
        for K, N in ((256, 128), (64, 64)):
            packed, layer = random_layer(K, N, bits, gs, False, bits + gs + K)
            reference = fmt.dequantize(*packed, bits, "gptq", dtype=torch.float64)  # as bench.kernels checks
            for ptx in (True, False):
                triton_kernels.INTERPRETED = not ptx  # launch_fused passes USE_ASM = not INTERPRETED
                for rows, split in ROWS_SPLITS:
                    x = torch.randn(rows, K, device="cuda").half()
                    cfg = kr.GemmConfig("fused", 16, 64, bk, split, 4, num_stages=3, mode=5)
                    err = rel_err(kr.launch_fused(x, layer, cfg), x.double() @ reference)
                    print(f"| {bits} | {gs} | {bk} | {bk // values_per_block(bits)} | {K}x{N} | {ptx} | "
                          f"{rows} | {split} | {err:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
