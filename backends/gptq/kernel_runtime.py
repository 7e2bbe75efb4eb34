"""Host side of the Triton kernels: the per-layer tensors the kernels read, the launch of each path,
and a small autotuner that picks a config per (M bucket, shape, bits, group) on the GPU in use.

Why an own tuner instead of `triton.autotune`: the candidates span two paths (fused kernel or
dequantize + cuBLAS), split-K needs a zeroed fp32 buffer, and the choice is kept per backend instance
(no module-level state) and on disk, so a restart does not re-tune. The configs and their file are in
tuner_cache.py, the timing in timing.py, the word orders the kernels read in word_order.py.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from backends.gptq import offload
from backends.gptq.parallel_compile import compile_all, launcher
from backends.gptq.timing import cold_copies, graph_time_ms
from backends.gptq.tuner_cache import GemmConfig, read_tuner_cache, save_configs
from backends.gptq.word_order import values_per_block

log = logging.getLogger(__name__)

FUSED_MAX_M = 64
VERIFY_TOLERANCE = 1e-2  # relative error of a kernel's output against its torch reference (fp16: ~1e-3)


def disagreement(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when a kernel's output matches its reference within VERIFY_TOLERANCE, else the relative
    error in words. The one rule by which the tuner, the attention route and the residual route drop a
    kernel that a GPU or compiler gets wrong."""
    err = float((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))
    return None if math.isfinite(err) and err <= VERIFY_TOLERANCE else f"relative error {err:.2g}"


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (2 elsewhere: launch-size heuristics need a number)."""
    if device is None or torch.device(device).type != "cuda":
        return 2
    return _cuda_sm_count(torch.device(device).index if torch.device(device).index is not None
                          else torch.cuda.current_device())


def pdl_supported(device) -> bool:
    """Whether kernels on `device` can be launched as programmatic dependent launches: a kernel may
    start (and read its constant weights) while the previous one finishes. Needs sm_90+ and a Triton
    with grid dependency control."""
    from backends.gptq.triton_kernels import INTERPRETED, gdc_wait
    if gdc_wait is None or INTERPRETED or device is None or torch.device(device).type != "cuda":
        return False
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 9


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


HALF2_BITS = (2, 3, 4)  # the half2 kernels' widths (modes 4 and 5); 8-bit words are interleaved for mode 8
# value blocks per K tile the tensor-core kernel (mode 5) needs: each tl.dot then spans 32 rows. With two blocks
# (16-row dots: 2-bit groups of 32, 3-bit groups of 64) its compiled form gave wrong sums on an H200 and an H100
# (triton 3.6, 2026-12-05: relative error 1.1-1.6 at 2, 3 and 4 bits, with and without the inline PTX, at every
# split; tests/backends/gptq/test_cuda_candidates.py) while the interpreter's were right; four blocks were right
MODE5_MIN_BLOCKS = 4
PDL_MODES = (4, 8)  # the kernels launch_fused(pdl=True) launches as programmatic dependent launches



@dataclass
class KernelLayer:
    """One GPTQ linear in the form the kernels read: qweight rows sorted by group (act-order undone),
    true zero points as uint8, `perm` the activation order (None when rows were already sorted)."""
    qweight: torch.Tensor        # int32 [K*bits/32, N]
    scales: torch.Tensor         # float16 [G, N]
    zeros: torch.Tensor          # uint8 [G, N]
    perm: torch.Tensor | None    # int32 [K]
    bits: int
    K: int
    N: int
    group_size: int              # rows per group in sorted order; K when there is one group
    interleaved: bool = False    # 2/3/4/8-bit words in the half2 kernel's order of `interleave_pairs`
    fields3: bool = False        # 3-bit words in mode 8's fields order (`fields3`) instead of the planes order

    @property
    def Kw(self) -> int:
        return self.qweight.shape[0]

    @property
    def word_order(self) -> int:
        """The Triton kernels' INTERLEAVED argument: 0 checkpoint order, 1 `interleave_pairs`, 2 `fields3`."""
        return 2 if self.fields3 else int(self.interleaved)

    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales, self.zeros] + ([self.perm] if self.perm is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def valid_block_ks(layer: KernelLayer, candidates=(32, 64, 128, 256, 512)) -> list[int]:
    """BLOCK_K values whose tiles hold whole value blocks and never straddle a group."""
    vpb = values_per_block(layer.bits)
    out = []
    for bk in candidates:
        if bk % vpb or bk < 16:
            continue
        if layer.group_size >= layer.K or layer.group_size % bk == 0:
            out.append(bk)
    return out


def _split_for(layer: KernelLayer, block_n: int, block_k: int, target_programs: int) -> int:
    n_tiles = -(-layer.N // block_n)
    k_tiles = -(-layer.K // block_k)
    split = max(1, min(k_tiles, target_programs // max(n_tiles, 1)))
    per = -(-k_tiles // split)
    return -(-k_tiles // per)


def _tiles_per_split(layer: KernelLayer, cfg: GemmConfig) -> int:
    """K tiles of one split (the last split may have fewer)."""
    k_tiles = -(-layer.K // cfg.block_k)
    return -(-k_tiles // cfg.split_k)


def whole_tiles(layer: KernelLayer, cfg: GemmConfig) -> bool:
    """Every tile of the config lies inside the matrix (the usual LLM shapes), so the half2 kernels
    run without bounds masks (EVEN): 5-14% fewer instructions in their loops (sm_90 SASS)."""
    return layer.N % cfg.block_n == 0 and layer.K % cfg.block_k == 0


def hopper(device) -> bool:
    """Whether `device` is an sm_90 GPU (warpgroup MMA: mode 9)."""
    return device is not None and torch.device(device).type == "cuda" and \
        torch.cuda.get_device_capability(torch.device(device))[0] == 9


def fields3_for(device) -> bool:
    """Whether 3-bit layers on `device` are laid out in mode 8's fields order (`fields3`): where mode 8 runs
    (Gluon compiled, a CUDA GPU with mma.sync, sm_80+). That order is read by mode 8, the dequantize kernel
    and the portable modes 0, 1 and 3; the half2 kernels (modes 4, 5) and mode 2 read the planes order,
    which the layers keep everywhere else."""
    if device is None or torch.device(device).type != "cuda" or not gluon_kernels_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def gluon_kernels_available() -> bool:
    """Whether this Triton has Gluon and runs compiled (the interpreter cannot run Gluon kernels)."""
    from backends.gptq import gluon_mma
    from backends.gptq.triton_kernels import INTERPRETED
    return gluon_mma.AVAILABLE and not INTERPRETED


def _whole_tile_configs(layer: KernelLayer, bucket: int, bk: int, tiles, fits, mode: int, sms: int) -> list[GemmConfig]:
    """The Gluon kernels' configs: each (columns, warps) tile that `fits` (bk, columns, warps) and divides the
    layer into whole tiles, at about 8, 4 and 16 programs per SM (the split counts that won H200 sweeps)."""
    out = []
    for bn, warps in tiles:
        if not bk or not fits(bk, bn, warps) or layer.N % bn or layer.K % bk:
            continue
        for target in (8 * sms, 4 * sms, 16 * sms):
            cfg = GemmConfig("fused", bucket, bn, bk, _split_for(layer, bn, bk, target), warps, num_stages=1,
                             mode=mode)
            if cfg not in out:
                out.append(cfg)
    return out


def _gluon_mma_candidates(layer: KernelLayer, bucket: int, bks: list[int], sms: int) -> list[GemmConfig]:
    """Mode 7 configs: whole tiles only; 32-64 columns per warp and the split counts that won H200 sweeps."""
    from backends.gptq import gluon_mma
    if bucket != gluon_mma.ROWS or layer.bits != 4 or not layer.interleaved:
        return []
    # the best of H200 sweeps at 16 rows (bench.gemv_sweep --mode 7, bench/RESULTS.md, 2026-12-03): 128-row
    # tiles (shorter for small groups), 64 columns per warp first (on 8192x28672 52.9 us against 54.9-56.7
    # at 32 per warp: each warp reads all of x, so wider warps read less of it, at 232-241 registers)
    bk = max((b for b in bks if gluon_mma.CHUNK <= b <= 128), default=0)
    return _whole_tile_configs(layer, bucket, bk, ((64, 1), (128, 2), (64, 2), (32, 1)), gluon_mma.valid, 7, sms)


def _gluon_block_k(layer: KernelLayer, bks: list[int]) -> int:
    """The tile length modes 8 and 9 run: the longest of whole chunks, up to 128 values (8 bits: 64, the bytes
    of a 4-bit 128-value tile; 128 8-bit values on 128-column warps spill at one row, sm_90), that a group
    allows (0: none)."""
    from backends.gptq import gluon_gemv
    longest = 64 if layer.bits == 8 else 128
    return max((b for b in bks if gluon_gemv.chunk(layer.bits) <= b <= longest), default=0)


# mode 8's register caps per thread for its form-3 candidates: the best of 0/96/128/168 at one row and of
# 0/128-248 at 16 rows in H200 sweeps (bench/RESULTS.md, 2026-12-04 20:10-20:40; 200 and 248 within 2% of
# each other, 184-192 and 128-168 slower)
ROW_REGISTER_CAPS = (128,)
ROWS16_REGISTER_CAPS = (200, 248)


def _gluon_gemv_candidates(layer: KernelLayer, bucket: int, bks: list[int], sms: int) -> list[GemmConfig]:
    """Mode 8 configs (gluon_gemv.py): whole tiles, the longest a group allows; 64-128 columns per warp at one
    row (256 on 4 warps won there on an H200), 32-64 at 2-16 rows (16 rows take twice the accumulators:
    174 registers at 64 columns, 128 at 32, sm_90; the H200 picks were 32 or 64 on one warp)."""
    from backends.gptq import gluon_gemv
    if bucket not in (1, 16) or not gluon_gemv.takes_words(layer):
        return []
    bk = _gluon_block_k(layer, bks)
    fits = lambda bk, bn, warps: gluon_gemv.valid(layer.bits, bk, bn, warps)
    # tiles of two groups (GROUPS = 2) for 4-bit layers with groups shorter than 128 values: on an H200 they
    # took 4-bit g64 16 rows on 8192x28672 from 68.5 to 51.6-52.1 us (bench/RESULTS.md, 2026-12-04 14:15);
    # 2-bit g64 layers never picked them there
    two = 2 * layer.group_size
    bk_pairs = ([two] if layer.bits == 4 and two <= 128
                and gluon_gemv.groups_per_tile(layer.bits, two, layer.group_size, layer.K) == 2 else [])
    tiles = (((256, 4), (128, 1), (256, 2), (512, 4), (64, 1)) if bucket == 1
             # (64-row tiles at 4 bits, 64 columns per warp in 138 registers instead of 174, were never picked
             # on an H200, 2026-12-04)
             else ((64, 1), (128, 2), (32, 1), (256, 4)))
    out = [c for b in bk_pairs + [bk] for c in _whole_tile_configs(layer, bucket, b, tiles, fits, 8, sms)]
    if bucket == 16:
        # the pipeline forms of gluon_gemv.PIPELINES, each the fastest somewhere at 16 rows on an H200
        # (2026-12-04): words two tiles ahead on 64-column warps, and (2-bit layers, the only ones that picked
        # it) words and x one tile ahead; one row keeps form 1 (x in its own iteration), which tied or won
        # everywhere there
        out += ([replace(c, num_stages=2) for c in out if c.block_n // c.num_warps == 64]
                + [replace(c, num_stages=3) for c in out if layer.bits == 2])
    # words and x one tile ahead (form 3) under a register cap (ptxas maxnreg), which ptxas schedules to: at
    # 16 rows it then spends 200 registers where it takes 172 without a cap, at one row it fits the 2-bit
    # 128-column warps in 128 instead of 168 (16 warps an SM instead of 12). On an H200 (2026-12-04,
    # bench.gemv_sweep --registers) that took 4-bit 16 rows from 48.0-48.3 to 45.4-46.4 us on 8192x28672 and
    # from 15.8 to 14.6 on 4096x11008, 3-bit 16 rows from 54.4 to 52.6, and 2-bit one row from 27.5 to 25.6
    caps = ROW_REGISTER_CAPS if bucket == 1 else ROWS16_REGISTER_CAPS
    out += [replace(c, num_stages=3, max_registers=cap) for cap in caps for c in out if c.num_stages == 1]
    return out


def _gluon_wgmma_candidates(layer: KernelLayer, bucket: int, bks: list[int], sms: int) -> list[GemmConfig]:
    """Mode 9 configs (gluon_wgmma.py), 2-16 rows: one warpgroup, 128 or 256 columns (the H200 picks were
    128), the longest tile a group allows."""
    from backends.gptq import gluon_wgmma
    if bucket != gluon_wgmma.ROWS or layer.bits not in gluon_wgmma.BITS or not layer.interleaved:
        return []
    bk = _gluon_block_k(layer, bks)
    fits = lambda bk, bn, warps: gluon_wgmma.valid(layer.bits, bk, bn, warps)
    out = []
    for c in _whole_tile_configs(layer, bucket, bk, ((128, 4), (256, 4)), fits, 9, sms):
        k_tiles = layer.K // c.block_k
        split = next((s for s in range(c.split_k, 0, -1) if gluon_wgmma.splits_of_two_tiles(k_tiles, s)), 0)
        if split and replace(c, split_k=split) not in out:  # two or more tiles a split
            out.append(replace(c, split_k=split))
    return out


def launch_fused(x2d: torch.Tensor, layer: KernelLayer, cfg: GemmConfig, out: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, scratch: "SplitScratch | None" = None,
                 pdl: bool = False, compile_only: bool = False) -> torch.Tensor:
    """y[M, N] = x2d @ W (+ bias), written into `out` when given (every element is written).
    pdl: the matrix-vector kernels (PDL_MODES) are launched as programmatic dependent launches (only
    where pdl_supported): their first weight reads start while the previous kernel finishes, and an
    act-order gather before them lets them start at once (gather.py's trigger).
    compile_only: compile the kernel for this call without running it (parallel_compile.compile_all)."""
    from backends.gptq.triton_kernels import gptq_gemm_kernel
    M = x2d.shape[0]
    if M > cfg.block_m:
        raise ValueError(f"config block_m {cfg.block_m} cannot hold {M} rows")
    vpb = values_per_block(layer.bits)
    kb = cfg.block_k // vpb
    k_tiles = -(-layer.K // cfg.block_k)
    per = _tiles_per_split(layer, cfg)
    split = -(-k_tiles // per)
    n_tiles = -(-layer.N // cfg.block_n)
    if out is None:
        out = torch.empty(M, layer.N, device=x2d.device, dtype=x2d.dtype)
    has_perm = layer.perm is not None
    if has_perm and cfg.gather_x:
        # sorted-row order: the kernel then reads x contiguously
        from backends.gptq import gather
        if M <= gather.MAX_ROWS and x2d.stride(1) == 1:
            x2d = gather.gather_columns(x2d, layer.perm, compile_only=compile_only,
                                        trigger=pdl and cfg.mode in PDL_MODES)
        else:
            x2d = x2d.index_select(1, layer.perm)
        has_perm = False
    if split > 1:
        scratch = scratch or SplitScratch()
        ws, tickets = scratch.get(split * M * layer.N, n_tiles, x2d.device)
    else:
        ws = tickets = out
    perm = layer.perm if layer.perm is not None else layer.qweight  # dummy pointer when unused
    even = whole_tiles(layer, cfg)
    if cfg.mode == 4:
        from backends.gptq.triton_kernels import INTERPRETED, gptq_gemv_h2_kernel
        if (M != 1 or x2d.dtype != torch.float16 or not layer.interleaved or layer.fields3
                or layer.bits not in HALF2_BITS):
            raise ValueError("the half2 matrix-vector kernel (mode 4) takes one fp16 row and interleaved 2/3/4-bit "
                             "words (3 bits in the planes order)")
        x_row = aligned_row(x2d)
        # stage_x: the split's rows rounded up to a power of two (a Triton block size)
        stage = 1 << (per * cfg.block_k - 1).bit_length() if has_perm and cfg.stage_x else 0
        pairs = (scratch or SplitScratch()).sorted_x(layer.K, x2d.device) if stage else x_row
        launcher(gptq_gemv_h2_kernel, (n_tiles, split), compile_only)(
            x_row, pairs.view(torch.int32), layer.qweight, layer.scales, layer.zeros, perm, out,
            bias if bias is not None else out, ws, tickets, layer.N, layer.K, layer.Kw, layer.group_size, per, split,
            BITS=layer.bits, KB=kb, BLOCK_N=cfg.block_n, STAGE_X=stage,
            HAS_PERM=has_perm and not stage, SPLIT=split > 1, HAS_BIAS=bias is not None,
            USE_ASM=not INTERPRETED, PDL=pdl, EVEN=even, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **cfg.compile_options(), **({"launch_pdl": True} if pdl else {}))
        return out
    if cfg.mode == 5:
        from backends.gptq.triton_kernels import INTERPRETED, gptq_gemm_h2_kernel
        if (x2d.dtype != torch.float16 or not layer.interleaved or layer.fields3 or layer.bits not in HALF2_BITS
                or kb < MODE5_MIN_BLOCKS):
            raise ValueError("the half2 tensor-core kernel (mode 5) takes fp16 rows and interleaved 2/3/4-bit "
                             f"words (3 bits in the planes order), at least {MODE5_MIN_BLOCKS} value blocks per "
                             "column of a tile")
        launcher(gptq_gemm_h2_kernel, (n_tiles, split), compile_only)(
            x2d, layer.qweight, layer.scales, layer.zeros, perm, out, bias if bias is not None else out, ws, tickets,
            M, layer.N, layer.K, layer.Kw, x2d.stride(0), out.stride(0), layer.group_size, per, split,
            KB=kb, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_PERM=has_perm,
            SPLIT=split > 1, HAS_BIAS=bias is not None, USE_ASM=not INTERPRETED, EVEN=even, BITS=layer.bits,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.compile_options())
        return out
    if cfg.mode == 7:
        from backends.gptq import gluon_mma
        if not gluon_mma.supports(x2d, layer, cfg) or has_perm:
            raise ValueError("the Gluon tensor-core kernel (mode 7) takes 2-16 fp16 rows on CUDA, interleaved "
                             "4-bit words in whole tiles, and act-order only through gather_x")
        x2d = paired_rows(x2d)
        launcher(gluon_mma.gptq_mma4_kernel, (n_tiles, split), compile_only)(
            x2d, layer.qweight, layer.scales, layer.zeros, out, bias if bias is not None else out, ws, tickets,
            M, layer.N, layer.K, x2d.stride(0), out.stride(0), layer.group_size, per, split,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1, HAS_BIAS=bias is not None,
            W_LAYOUT=gluon_mma.word_layout(cfg.block_k, cfg.block_n, cfg.num_warps),
            X_LAYOUT=gluon_mma.x_layout(cfg.block_k, cfg.num_warps), num_warps=cfg.num_warps,
            **cfg.compile_options())
        return out
    if cfg.mode == 8:
        from backends.gptq import gluon_gemv
        if not gluon_gemv.supports(x2d, layer, cfg) or has_perm:
            raise ValueError("the Gluon matrix-vector kernel (mode 8) takes 1-16 fp16 rows on CUDA, interleaved "
                             "2/4/8-bit or fields-order 3-bit words in whole tiles, and act-order only through "
                             "gather_x")
        x2d = paired_rows(x2d)
        rows = gluon_gemv.operand_rows(M)
        launcher(gluon_gemv.gptq_mma_t_kernel, (n_tiles, split), compile_only)(
            x2d, layer.qweight, layer.scales, layer.zeros, out, bias if bias is not None else out, ws, tickets,
            M, layer.N, layer.K, x2d.stride(0), out.stride(0), layer.group_size, per, split,
            BITS=layer.bits, R=rows, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
            HAS_BIAS=bias is not None, num_warps=cfg.num_warps, **cfg.compile_options(),
            GROUPS=gluon_gemv.groups_per_tile(layer.bits, cfg.block_k, layer.group_size, layer.K),
            **gluon_gemv.pipeline(cfg.num_stages),
            **gluon_gemv.layouts(layer.bits, cfg.block_k, cfg.block_n, cfg.num_warps, rows),
            **({"PDL": True, "launch_pdl": True} if pdl else {}))
        return out
    if cfg.mode == 9:
        from backends.gptq import gluon_wgmma
        if not gluon_wgmma.supports(x2d, layer, cfg) or has_perm:
            raise ValueError("the warpgroup-MMA kernel (mode 9) takes 2-16 fp16 rows on sm_90, interleaved "
                             "2/4-bit words in whole tiles, four warps, two or more K tiles per split, and "
                             "act-order only through gather_x")
        x2d = paired_rows(x2d)
        launcher(gluon_wgmma.gptq_wgmma_kernel, (n_tiles, split), compile_only)(
            x2d, layer.qweight, layer.scales, layer.zeros, out, bias if bias is not None else out, ws, tickets,
            M, layer.N, layer.K, x2d.stride(0), out.stride(0), layer.group_size, per, split,
            BITS=layer.bits, R=gluon_wgmma.ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
            HAS_BIAS=bias is not None, num_warps=cfg.num_warps, **cfg.compile_options(),
            **gluon_wgmma.layouts(layer.bits, cfg.block_k, cfg.block_n))
        return out
    if cfg.mode == 3:
        from backends.gptq.triton_kernels import gptq_gemv_kernel
        if M != 1:
            raise ValueError("the prefetching matrix-vector kernel (mode 3) takes one row")
        launcher(gptq_gemv_kernel, (n_tiles, split), compile_only)(
            x2d, layer.qweight, layer.scales, layer.zeros, perm, out, bias if bias is not None else out, ws,
            tickets, layer.N, layer.K, layer.Kw, layer.group_size, per, split,
            BITS=layer.bits, VPB=vpb, KB=kb, BLOCK_N=cfg.block_n, HAS_PERM=has_perm,
            SPLIT=split > 1, HAS_BIAS=bias is not None, INTERLEAVED=layer.word_order,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.compile_options())
        return out
    if cfg.mode == 2 and layer.bits == 3 and (layer.fields3 or cfg.block_m == 1 and layer.interleaved):
        raise ValueError("the unrolled kernel (mode 2) reads 3-bit words in the checkpoint's order (M = 1) or "
                         "the planes order, not mode 8's fields order")
    launcher(gptq_gemm_kernel, (n_tiles, split), compile_only)(
        x2d, layer.qweight, layer.scales, layer.zeros, perm, out, bias if bias is not None else out, ws, tickets,
        M, layer.N, layer.K, layer.Kw, x2d.stride(0), out.stride(0), layer.group_size, per, split,
        BITS=layer.bits, VPB=vpb, KB=kb, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_PERM=has_perm, SPLIT=split > 1, HAS_BIAS=bias is not None, MODE=cfg.mode,
        INTERLEAVED=layer.word_order, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.compile_options())
    return out


def aligned_row(x2d: torch.Tensor) -> torch.Tensor:
    """x2d contiguous and 8-byte aligned: the half2 matrix-vector kernel reads x's pairs two at a time
    (triton_kernels._x_pairs), and a row viewed at an odd 2-element offset would fault there."""
    x_row = x2d if x2d.is_contiguous() else x2d.contiguous()
    return x_row if x_row.data_ptr() % 8 == 0 else x_row.clone()


def paired_rows(x2d: torch.Tensor) -> torch.Tensor:
    """x2d with unit column stride, an even row stride and a 4-byte aligned start: the Gluon kernel
    (gluon_mma.py) reads each row as int32 pairs; any other view is copied first."""
    if x2d.stride(1) == 1 and x2d.stride(0) % 2 == 0 and x2d.data_ptr() % 4 == 0:
        return x2d
    x2d = x2d.contiguous()
    return x2d if x2d.data_ptr() % 4 == 0 and x2d.shape[1] % 2 == 0 else x2d.clone()


class SplitScratch:
    """The fp32 partials and per-column-tile tickets of split-K launches (and the per-head ones of the
    decoding attention kernel, which merges its splits the same way), and the sorted-activation row
    of stage_x. Tickets return to zero after
    every launch, so one buffer serves every layer (launches on one stream never overlap). Grown only
    outside graph capture: the decoder's eager steps size it before capturing."""

    def __init__(self):
        self.ws: torch.Tensor | None = None
        self.tickets: torch.Tensor | None = None
        self._sorted_x: torch.Tensor | None = None

    def sorted_x(self, numel: int, device) -> torch.Tensor:
        """The fp16 row that stage_x programs gather the activations into (sorted order), padded to
        whole int32 pairs; each program writes and reads only its own split's slice."""
        numel += numel % 2
        row = self._sorted_x
        if row is None or row.numel() < numel or row.device != torch.device(device):
            self._sorted_x = row = torch.empty(max(numel, 1 << 14), dtype=torch.float16, device=device)
        return row

    def get(self, ws_numel: int, n_tiles: int, device):
        if self.ws is None or self.ws.numel() < ws_numel or self.ws.device != torch.device(device):
            self.ws = torch.empty(max(ws_numel, 1 << 16), dtype=torch.float32, device=device)
        if self.tickets is None or self.tickets.numel() < n_tiles or self.tickets.device != torch.device(device):
            self.tickets = torch.zeros(max(n_tiles, 1024), dtype=torch.int32, device=device)
        return self.ws, self.tickets


def launch_dequant(layer: KernelLayer, out: torch.Tensor, block_n: int = 256, block_k: int = 32,
                   original_order: bool = True, num_warps: int = 4) -> torch.Tensor:
    """Fill out[K, N] (fp16/fp32) with the dequantized weights, rows in the checkpoint's original order
    (act-order undone by a scatter) unless `original_order` is False (sorted order). The tile: 256 x 32
    was the fastest of 18 on 7 of the 8 7B shapes at M = 2048 on an H200 (2026-12-05 12:08, 8-12% under
    the 128 x 64 before it; `bench.kernels --m 2048`)."""
    from backends.gptq.triton_kernels import gptq_dequant_kernel
    vpb = values_per_block(layer.bits)
    block_k = max(block_k, vpb)
    grid = (-(-layer.K // block_k), -(-layer.N // block_n))
    scatter = original_order and layer.perm is not None
    launcher(gptq_dequant_kernel, grid)(layer.qweight, layer.scales, layer.zeros,
                                        layer.perm if scatter else layer.qweight, out, layer.N, layer.K, layer.Kw,
                                        layer.group_size, BITS=layer.bits, VPB=vpb, KB=block_k // vpb,
                                        BLOCK_N=block_n, HAS_PERM=scatter, INTERLEAVED=layer.word_order,
                                        num_warps=num_warps)
    return out


class KernelRuntime:
    """Runs GPTQ matmuls on CUDA for one loaded model: picks (and, when `tune`, measures) a config per
    shape, and owns the reusable fp16 buffer of the dequantize + cuBLAS path."""

    def __init__(self, tune: bool = True, cache_file: Path | None = None, modes: tuple[int, ...] | None = None,
                 pdl: bool = False, compile_workers: int | None = None):
        self.tune = tune
        # threads that compile a shape's candidates at once before they are timed (None: one per core,
        # parallel_compile.default_workers; 1: one by one, as each is first launched)
        self.compile_workers = compile_workers
        self.pdl = pdl  # programmatic dependent launches of the matrix-vector kernel (check pdl_supported)
        self.cache_file = cache_file
        self.allowed_modes = modes  # restrict the fused kernel's unpacking modes (benchmarks, debugging)
        self.configs: dict[str, GemmConfig] = {}
        self._workspace: torch.Tensor | None = None
        self.scratch = SplitScratch()
        if cache_file is not None:
            self.configs = read_tuner_cache(cache_file)
        # keys read from the file whose config is not yet checked against what this code offers: a file
        # written by an older version may hold a config since withdrawn (mode 5 on two-block tiles)
        self._unchecked = set(self.configs)

    # -- public ------------------------------------------------------------------------------
    def matmul(self, x2d: torch.Tensor, layer: KernelLayer, bias: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config_for(x2d, layer)
        return self.run(x2d, layer, cfg, bias)

    def run(self, x2d: torch.Tensor, layer: KernelLayer, cfg: GemmConfig, bias: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        if cfg.path == "fused":
            return launch_fused(x2d, layer, cfg, out=out, bias=bias, scratch=self.scratch, pdl=self.pdl)
        w = self.workspace(layer.K * layer.N, x2d.dtype, x2d.device)[: layer.K * layer.N].view(layer.K, layer.N)
        launch_dequant(layer, w)  # rows in original order: x needs no permutation
        y = x2d @ w if bias is None else torch.addmm(bias.to(x2d.dtype), x2d, w)
        return y if out is None else out.copy_(y)

    def workspace(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        ws = self._workspace
        if ws is None or ws.numel() < numel or ws.dtype != dtype or ws.device != torch.device(device):
            self._workspace = ws = torch.empty(numel, dtype=dtype, device=device)
        return ws

    def reserve_workspace(self, layers: list[KernelLayer], dtype: torch.dtype, device) -> None:
        """Allocate the prefill buffer once, sized for the largest layer, before graphs are captured."""
        if layers:
            self.workspace(max(l.K * l.N for l in layers), dtype, device)

    @staticmethod
    def m_bucket(M: int) -> int:
        if M == 1:
            return 1
        for b in (16, 32, 64):
            if M <= b:
                return b
        return 0  # large: dequantize + cuBLAS

    def key(self, x2d: torch.Tensor, layer: KernelLayer) -> str:
        # codes in host memory (offload.py) are read over PCIe: tuned apart from the same shape on the GPU
        host = "-host" if offload.on_host(layer.qweight) else ""
        return (f"m{self.m_bucket(x2d.shape[0])}-k{layer.K}-n{layer.N}-b{layer.bits}-g{layer.group_size}"
                f"-p{int(layer.perm is not None)}-{str(x2d.dtype).split('.')[-1]}{host}"
                + ("-f3" if layer.fields3 else ""))

    def config_for(self, x2d: torch.Tensor, layer: KernelLayer) -> GemmConfig:
        """The config for this shape: cached (if this code still offers it), else measured when tuning on
        CUDA, else the untuned default. Only a tuning runtime saves its picks, and never a default taken
        inside a CUDA graph capture (nothing can be timed there): an untuned default saved would stop every
        later run from measuring that shape."""
        key = self.key(x2d, layer)
        cfg = self.configs.get(key)
        if cfg is not None and key in self._unchecked:
            self._unchecked.discard(key)
            # (the dequantize path is what tuning saves where no fused config was right)
            if cfg.path != "dequant" and cfg not in self.candidates(x2d.shape[0], layer, x2d.device, x2d.dtype,
                                                                    every=True):
                log.info("tuner cache entry %s holds a config no longer offered (%s): picked again", key, cfg)
                cfg = None
        if cfg is None:
            candidates = self.candidates(x2d.shape[0], layer, x2d.device, x2d.dtype)
            capturing = x2d.is_cuda and torch.cuda.is_current_stream_capturing()
            if self.tune and x2d.is_cuda and len(candidates) > 1 and not capturing:
                cfg = self._measure(x2d, layer, candidates)
            else:
                cfg = candidates[0]
            if capturing:
                # not kept: a later save would write it (every later process would then skip measuring the
                # shape), and the first call outside a capture measures it
                return cfg
            self.configs[key] = cfg
            if self.tune:
                self._save()
        return cfg

    @staticmethod
    def modes(bucket: int, layer: KernelLayer, dtype, every: bool = False) -> tuple[int, ...]:
        """Unpacking modes worth trying, the untuned default first. The half2 kernel (mode 4) is only
        taken when the tuner has measured it (and checked its output) on the GPU in use. every: also the
        modes that run here but are left out to save tuning time (for modes asked for by name)."""
        if layer.fields3:
            # mode 8's 3-bit order: mode 8 where it runs (1 and 16 rows, fp16), else the portable modes that
            # read it (mode 3 and mode 0 stay the untuned defaults: they need no measuring to be trusted)
            eight = (8,) if dtype == torch.float16 and gluon_kernels_available() else ()
            if bucket == 1:
                return (3, *eight, 0)
            return (0, *eight, 1) if bucket == 16 else (0, 1)
        half2 = dtype == torch.float16 and layer.interleaved and layer.bits in HALF2_BITS
        # 8-bit words are interleaved for mode 8 alone (the half2 kernels take 2-4 bits); mode 8 is offered
        # for them at one and 16 rows where Gluon runs
        bytes8 = dtype == torch.float16 and layer.interleaved and layer.bits == 8 and gluon_kernels_available()
        if bucket == 1:
            modes = (3, 4, 0, 2) if half2 else (3, 8, 0, 2) if bytes8 else (3, 0, 2)
            if half2 and gluon_kernels_available() and (layer.bits == 2 or every):
                # mode 8 with its loads in column runs beat mode 4 at one row on 2-bit 8192x28672 by 5% (and
                # lost by 4% on 4096x11008) on an H200, 2026-12-04; at 4 bits it tied or lost, so it is not
                # offered there by default (tuning time)
                modes = (3, 4, 8, 0, 2)
        else:
            modes = (2, 0, 1) if dtype == torch.float16 else (0, 1)
            if bytes8:
                modes = (2, 8, 0, 1)
            if half2:
                # the half2 tensor-core kernel leads: at M = 16 on an H200 1.7-1.8x faster than mode 2
                # at 4 bits, 1.8-2.3x faster than mode 0 at 2 and 3 bits (bench/RESULTS.md); at M = 1
                # it loses to mode 4
                modes = (5, 2, 0, 1)
                if layer.bits == 4 and gluon_kernels_available():
                    # mode 7 (Gluon) won by 5-15% on an H200, the only GPU it has run on: the tuner picks
                    # it where it measures faster, and mode 5 stays the untuned default
                    modes = (5, 7, 8, 2, 0, 1)
                elif layer.bits == 2 and gluon_kernels_available():
                    # mode 8 (Gluon, weights as the A operand without fix-ups) took 2 bits at 4 and 16 rows
                    # from 21-77 us to 15-55 on an H200 (bench/RESULTS.md, 2026-12-03 23:00); mode 9 (wgmma)
                    # took 2-bit 16 rows on 4096x11008 from 16.3 to 14.5 us (2026-12-04 13:43)
                    modes = (5, 8, 9, 2, 0, 1)
        if bucket == 1 and layer.bits == 3 and layer.interleaved:  # mode 2's M = 1 form reads checkpoint order
            modes = tuple(m for m in modes if m != 2)
        if every and bucket > 1 and half2 and layer.bits == 4 and gluon_kernels_available():
            modes += (9,)  # wgmma at 4 bits tied or lost to modes 7/8 on an H200: only when asked for by name
        return modes

    def candidates(self, M: int, layer: KernelLayer, device=None, dtype=torch.float16,
                   every: bool = False) -> list[GemmConfig]:
        """Configs worth trying, the heuristic default first. every: also the modes left out by default
        (what this code would run when asked for by name)."""
        sms = sm_count(device)
        bks = valid_block_ks(layer)
        bucket = self.m_bucket(M)
        dequant = GemmConfig(path="dequant")
        if not bks or bucket == 0:
            return [dequant]
        out: list[GemmConfig] = []
        if bucket == 1:
            tiles = [(256, 128, 4), (128, 128, 4), (64, 256, 4), (512, 64, 4), (512, 128, 8), (256, 64, 4)]
            targets = (4 * sms, 16 * sms)
        elif bucket == 16:
            tiles = [(64, 128, 4), (64, 64, 4), (128, 128, 4), (32, 128, 4)]
            targets = (4 * sms, 16 * sms)
        else:
            tiles = [(64, 64, 4), (128, 64, 4), (64, 128, 4)]
            targets = (2 * sms, 8 * sms)
        asked = self.allowed_modes
        modes = [m for m in self.modes(bucket, layer, dtype, every=every or asked is not None)
                 if asked is None or m in asked]
        for mode in modes:
            mode_tiles, mode_targets = tiles, targets
            if mode == 4:
                # narrow tiles on 2 warps (and wide ones on 2 warps with many splits) won on every 7B
                # decoding shape of an H200 sweep (bench/gemv_sweep.py, bench/RESULTS.md): 5-12% faster
                mode_tiles = [(32, 128, 2), (256, 64, 2), (64, 128, 4)] + tiles
                mode_targets = (4 * sms, 8 * sms, 16 * sms)
            if mode == 5:  # the best of an H200 sweep at M = 16 (bench/gemv_sweep.py --mode 5) first
                mode_tiles = [(64, 128, 4), (128, 128, 8), (128, 128, 4), (256, 128, 4)]
                mode_targets = (4 * sms, 8 * sms)  # 2-4 splits won there
            if mode == 7:
                out += _gluon_mma_candidates(layer, bucket, bks, sms)
                continue
            if mode == 8:
                out += _gluon_gemv_candidates(layer, bucket, bks, sms)
                continue
            if mode == 9:
                if hopper(device):
                    out += _gluon_wgmma_candidates(layer, bucket, bks, sms)
                continue
            stages = (3, 4) if mode == 5 else (2,)  # loads feeding tl.dot: Triton pipelines them (cp.async)
            for bn, bk, warps in mode_tiles:
                if mode == 2 and bucket > 1:  # one tl.dot per value slot needs >= 16 blocks per tile
                    bk = max(bk, 16 * values_per_block(layer.bits))
                if bk not in bks:
                    bk = min(bks, key=lambda b: abs(b - bk))
                if mode == 2 and bucket > 1 and bk // values_per_block(layer.bits) < 16:
                    continue
                if mode == 5 and bk // values_per_block(layer.bits) < MODE5_MIN_BLOCKS:
                    continue
                for target, st in itertools.product(mode_targets, stages):
                    cfg = GemmConfig("fused", bucket, bn, bk, _split_for(layer, bn, bk, target), warps,
                                     num_stages=st, mode=mode)
                    if cfg not in out:
                        out.append(cfg)
            if mode == 4:
                # the two best of a wider H200 sweep on 8192x28672 (bench.gemv_sweep, 2026-12-03: 35.2 and
                # 35.7 us against 36.8 for the best of the list above), at their programs per SM
                for bn, bk, warps, per_sm in ((1024, 64, 8, 2), (512, 32, 4, 6)):
                    cfg = GemmConfig("fused", bucket, bn, bk, _split_for(layer, bn, bk, per_sm * sms), warps,
                                     num_stages=2, mode=mode)
                    if bk in bks and cfg not in out:
                        out.append(cfg)
        if bucket > 1 and any(c.mode == 5 for c in out):
            # the tensor-core kernel won every 2-64-row case measured, by 1.7-2.3x (H100, H200:
            # bench/RESULTS.md): the other modes stay as one fallback config each (a GPU or compiler
            # that rejects mode 5 still gets a kernel) instead of grids that only cost tuning time
            kept, fallbacks = [], set()
            for c in out:
                if c.mode in (5, 7, 8, 9) or c.mode not in fallbacks:
                    kept.append(c)
                    fallbacks.add(c.mode)
            out = kept
        if layer.perm is not None:
            # act-order: also try gathering x once. For M > 1 the per-program scattered loads of x cost
            # far more than one gather launch, so the gathered configs lead; at M = 1 the tuner decides,
            # also between that and each program staging its own slice (mode 4, slices up to 4096 rows)
            gathered = [replace(c, gather_x=True) for c in out if bucket > 1 or c.mode in (3, 4, 8, 9)]
            out = [c for c in out if c.mode not in (7, 8, 9)]  # modes 7-9 read sorted x only
            staged = [replace(c, stage_x=True) for c in out
                      if bucket == 1 and c.mode == 4 and _tiles_per_split(layer, c) * c.block_k <= 4096]
            out = gathered + out if bucket > 1 else out + gathered + staged
        if bucket >= 32 or not out:
            out.append(dequant)
        return out

    # -- tuning --------------------------------------------------------------------------------
    def _measure(self, x2d, layer, candidates) -> GemmConfig:
        """The fastest candidate whose output matches the dequantize + cuBLAS result on a fresh input:
        a kernel that a compiler or GPU gets wrong is dropped, never picked for being fast."""
        return self.fastest(x2d, layer, candidates)[0]

    def fastest(self, x2d, layer, candidates) -> tuple[GemmConfig, float]:
        """(config, its GPU ms per call over cold weight copies) of the fastest correct candidate;
        the dequantize path with inf when none is both correct and compilable."""
        reference_cfg = GemmConfig(path="dequant")
        probe = torch.randn(x2d.shape, device=x2d.device).to(x2d.dtype)
        reference = self.run(probe, layer, reference_cfg).float()
        self.precompile(x2d, layer, candidates)
        best, best_ms = reference_cfg, float("inf")
        copies = cold_copies(layer, x2d.device)
        for cfg in candidates:
            try:
                if cfg.path == "fused":
                    problem = disagreement(self.run(probe, layer, cfg), reference)
                    if problem is not None:
                        log.warning("GPTQ kernel config %s gives a wrong result (%s) on %s; skipped",
                                    cfg, problem, torch.cuda.get_device_name(x2d.device))
                        continue
                ms = graph_time_ms(lambda i: self.run(x2d, copies[i % len(copies)], cfg),
                                   calls=max(10, 2 * len(copies)), reps=5)
            except Exception:  # a config the compiler rejects (resources) is simply skipped
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        return best, best_ms

    def precompile(self, x2d: torch.Tensor, layer: KernelLayer, candidates) -> int:
        """Compile the fused candidates side by side (parallel_compile) before they are timed one by
        one; returns how many were queued. Only where tuning runs: on CUDA, outside graph capture."""
        if self.compile_workers == 1 or not x2d.is_cuda:
            return 0
        fused = [c for c in candidates if c.path == "fused"]
        return compile_all((functools.partial(launch_fused, x2d, layer, c, scratch=self.scratch, pdl=self.pdl,
                                              compile_only=True) for c in fused), self.compile_workers)

    def _save(self) -> None:
        """Merge this runtime's configs into the shared cache file (tuner_cache.save_configs)."""
        if self.cache_file is not None:
            save_configs(self.cache_file, self.configs)
