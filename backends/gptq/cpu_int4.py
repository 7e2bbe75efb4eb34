"""2-, 3- and 4-bit GPTQ layers on CPU without a dequantized copy: torch's packed int4 matmul
(`aten._weight_int4pack_mm_for_cpu`, the kernel torchao's int4 weight-only CPU path runs).

Why: the CPU path otherwise keeps each layer dequantized in the model's dtype (fp32: 8x the bytes of the
4-bit codes), and when that does not fit it dequantizes every layer on every forward. A 7B model's fp32 copy
is 28 GB; its 4-bit codes and scales are 4. The packed kernel reads the codes as they are, with activations
in bf16 (its vectorized form; with fp32 or fp16 activations torch runs a reference loop 20-50x slower).

GPTQ's w = s (q - z) is the kernel's w = s (q - 8) + m with m = s (8 - z) per group and column; 2- and 3-bit
codes are held as 4-bit ones (half or three quarters more bytes than the checkpoint's, still a sixth to an
eighth of the fp32 copy), so EfficientQAT's w2g64 and w3g128 run the same kernel. They are stored moved up by
CODE_OFFSET[bits] (2-bit 6-9, 3-bit 4-11) and their zeros with them: the offset s (8 - z) is then about 0,
as at 4 bits, instead of 5-7 s, whose bf16 rounding would cost a 2-bit weight (1-3 s) about 1.5%. Act-order
layers are sorted by group once (rows in `perm` order), and x is gathered by the same perm per call.

The kernel reads every weight once per row of x (its time grows with the rows: 22 us a row for a 576x1536
layer on one core), so from DEQUANTIZE_ROWS rows on (prefill, perplexity windows) a layer is dequantized a
run of columns at a time from the packed codes, exactly as the checkpoint says (fp32), and multiplied by a
float matmul: the dequantized run stays in cache and never exists for the whole layer.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from backends.gptq import format as fmt

GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the kernel takes
WIDTHS = (2, 3, 4)  # code widths it runs: 2- and 3-bit codes (0-3, 0-7) are 4-bit codes that leave values unused
CODE_OFFSET = {2: 6, 3: 4, 4: 0}  # added to codes and zeros so both sit around the kernel's 8
DEQUANTIZE_ROWS = 128  # from this many rows on, a dequantized run of columns and a float matmul beat the kernel
COLUMNS_PER_RUN = 256  # columns dequantized at a time (a multiple of the layout's 64-column blocks)
BLOCK_COLUMNS = 64  # the packed layout's column blocks; the columns past the last whole one are packed apart


def available() -> bool:
    """Whether this torch has the CPU packed int4 kernels."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@functools.cache
def kernel_is_fast() -> bool:
    """Whether torch's kernel is vectorized on this machine (measured once a process, about 70 ms): at one row
    it runs within VECTORIZED_SLOWDOWN of the fp32 matmul. Torch vectorizes it for AVX2 and AVX-512 only, and
    not in MSVC builds: elsewhere it runs a reference loop, 13x slower than the fp32 copy at one row and 60x
    at 16 (ATEN_CPU_CAPABILITY=default, 2026-12-05), so `cpu_int4=auto` keeps the fp32 copy there. The margin
    is wide because the two cases are far apart and a busy machine moves single timings: a plain "faster
    than fp32" test once picked the copy on an AVX2 run whose kernel decodes 1.86x faster end to end."""
    if not available():
        return False
    K = N = 1024
    codes = torch.randint(0, 16, (K, N), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    weight = make_int4_weight(fmt.pack_qweight(codes, 4), fmt.pack_qzeros(torch.full((K // 128, N), 8), 4, "gptq"),
                              torch.full((K // 128, N), 0.01, dtype=torch.float16), None, 4, 128, "gptq")
    dense, x = weight.dense(), torch.randn(1, K)
    kernel, matmul = _best_times(lambda: weight.matmul(x), lambda: F.linear(x, dense))
    return kernel < VECTORIZED_SLOWDOWN * matmul


VECTORIZED_SLOWDOWN = 3.0  # kernel / fp32 time at one row: vectorized 0.5-1.2, the reference loop ~13


def _best_times(*fns, repeats: int = 7) -> list[float]:
    """The shortest of a few runs of each function after a warm-up, the functions taking turns: the least
    noisy estimate on a shared machine."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@dataclass
class Int4Weight:
    """One linear's codes in the kernel's packed layout with its scales and offsets, the checkpoint's own
    scales and zeros (for `dense`), and the activation order."""
    packed: torch.Tensor              # uint8 [N, K / 2], the kernel's layout (rows sorted by group)
    scales_and_offsets: torch.Tensor  # bf16 [K / group_size, N, 2]: s and s (8 - z) per kernel group
    group_size: int                   # the kernel's group (divides the checkpoint's)
    scales: torch.Tensor              # the checkpoint's [G, N] scales, zeros (uint8) and rows per group
    zeros: torch.Tensor
    rows: int
    perm: torch.Tensor | None         # int64 [K]: sorted row i is the checkpoint's row perm[i] (act-order)
    K: int
    N: int
    code_offset: int = 0              # CODE_OFFSET of the checkpoint's width, added to the held codes

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (for the memory report)."""
        return [t for t in (self.packed, self.scales_and_offsets, self.scales, self.zeros, self.perm) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ W (+ bias) -> [..., N]: nn.Linear's call on this layer (QuantLinear, the CPU decoder)."""
        y = self.matmul(x.reshape(-1, x.shape[-1]))
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], self.N)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d [M, K] (any float dtype) @ W -> [M, N] in x2d's dtype: through the kernel from bf16 activations
        below DEQUANTIZE_ROWS rows, through the exactly dequantized weights from there on."""
        x = x2d if self.perm is None else x2d.index_select(1, self.perm)
        if x.shape[0] >= DEQUANTIZE_ROWS:
            return self._dequantized_matmul(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.packed,
                                                        self.group_size, self.scales_and_offsets)
        return y.to(x2d.dtype)

    def _dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (rows sorted) @ W, COLUMNS_PER_RUN columns of W dequantized (fp32) at a time."""
        group_of = _checkpoint_group_of(self.K, self.group_size, self.rows)
        scales = self.scales.to(torch.float32).index_select(0, group_of)[:, None]  # [kernel groups, 1, N]
        zeros = (self.zeros.to(torch.float32) + self.code_offset).index_select(0, group_of)[:, None]
        outputs = []
        for start in range(0, self.N, COLUMNS_PER_RUN):
            stop = self._run_stop(start)
            w = self._codes_into(torch.empty(self.K, stop - start), start, stop)
            w.view(-1, self.group_size, stop - start).sub_(zeros[..., start:stop]).mul_(scales[..., start:stop])
            outputs.append(x @ w.to(x.dtype))
        return torch.cat(outputs, 1)

    def _run_stop(self, start: int) -> int:
        """The end of the run of columns from `start`: COLUMNS_PER_RUN on, or the layer's last columns (the
        layout's columns past the last whole 64-column block are packed together, so they end a run)."""
        stop = start + COLUMNS_PER_RUN
        return self.N if stop >= _whole_blocks(self.N) else stop

    def _codes_into(self, out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Writes the codes of columns [start, stop) into out [K, stop - start] (sorted rows). The kernel's
        layout (`_convert_weight_to_int4pack_for_cpu`, checked against it by the tests): 64-column blocks of
        [K, 32] bytes, low nibble column j, high nibble column 32 + j; the columns past the last whole block as
        [K, rest / 2] bytes, low nibble the even column, high the odd."""
        K, data = self.K, self.packed.view(-1)
        blocks_end = min(stop, _whole_blocks(self.N))
        if blocks_end > start:
            width = blocks_end - start
            blocks = data[start * K // 2: blocks_end * K // 2].view(width // 64, K, 32).permute(1, 0, 2)
            halves = out[:, :width].unflatten(1, (width // 64, 2, 32))
            halves[:, :, 0] = blocks & 15
            halves[:, :, 1] = blocks >> 4
        if stop > blocks_end:
            rest = stop - blocks_end
            pairs = data[blocks_end * K // 2:].view(K, rest // 2)
            nibbles = out[:, blocks_end - start:].unflatten(1, (rest // 2, 2))
            nibbles[..., 0] = pairs & 15
            nibbles[..., 1] = pairs >> 4
        return out

    def codes(self) -> torch.Tensor:
        """The checkpoint's codes [K, N] (int32, sorted rows), read out of the packed layout."""
        return self._codes_into(torch.empty(self.K, self.N, dtype=torch.int32), 0, self.N) - self.code_offset

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        """The checkpoint's dequantized weight [N, K] (nn.Linear layout, its own fp16 scales): for tests and
        exports."""
        group = torch.arange(self.K) // self.rows
        w = (self.codes().double() - self.zeros.double()[group]) * self.scales.double()[group]  # sorted rows
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm, w)
        return w.t().contiguous().to(dtype)


def fuse(weights: list[Int4Weight]) -> Int4Weight | None:
    """Sibling layers that read the same input (q/k/v, gate/up) as one layer whose columns are theirs side by
    side, or None where they differ in K, groups, code width or row order, or a sibling's N is not whole
    64-column blocks. Why: each kernel call has a fixed cost (about 3 us, and a gather of x for act-order
    layers); on the default model q/k/v take 31.5 us in one call against 45.6 in three. The packed layout is
    whole 64-column blocks one after another, so the fused layout is the siblings' bytes in sequence, and the
    siblings are left holding views of the fused bytes: fusing costs no RAM beyond the small scales."""
    first = weights[0]
    same = all(w.K == first.K and w.group_size == first.group_size and w.rows == first.rows
               and w.code_offset == first.code_offset and w.scales_and_offsets.dtype == first.scales_and_offsets.dtype
               and ((w.perm is None and first.perm is None)
                    or (w.perm is not None and first.perm is not None and torch.equal(w.perm, first.perm)))
               for w in weights)
    if not same or any(w.N % BLOCK_COLUMNS for w in weights):
        return None
    packed = torch.cat([w.packed for w in weights])
    for w, view in zip(weights, packed.split([w.N for w in weights])):
        w.packed = view
    return Int4Weight(packed=packed,
                      scales_and_offsets=torch.cat([w.scales_and_offsets for w in weights], 1),
                      group_size=first.group_size, scales=torch.cat([w.scales for w in weights], 1),
                      zeros=torch.cat([w.zeros for w in weights], 1), rows=first.rows, perm=first.perm,
                      K=first.K, N=sum(w.N for w in weights), code_offset=first.code_offset)


def _whole_blocks(N: int) -> int:
    """The columns in whole BLOCK_COLUMNS blocks of the packed layout."""
    return N // BLOCK_COLUMNS * BLOCK_COLUMNS


def _checkpoint_group_of(K: int, kernel_group: int, rows: int) -> torch.Tensor:
    """Each kernel group's GPTQ group (the checkpoint's groups of `rows` sorted rows span one or more)."""
    return torch.arange(K // kernel_group) * kernel_group // rows


def kernel_group_size(K: int, rows: int) -> int | None:
    """The kernel's group size for GPTQ groups of `rows` sorted rows: the largest size it takes that divides
    both (the checkpoint's scales then repeat over its groups: one group covering K, or K with a short last
    group, e.g. 576 rows in groups of 128 run as groups of 64), or None where none does."""
    return next((g for g in reversed(GROUP_SIZES) if rows % g == 0 and K % g == 0), None)


def make_int4_weight(qweight, qzeros, scales, g_idx, bits: int, group_size: int, checkpoint_format: str,
                     columns_per_pack: int = 2048) -> Int4Weight | None:
    """The packed form of a 2-, 3- or 4-bit CPU layer (held at 4 bits a code), or None where the kernel cannot
    run it (8 bits, N not a multiple of 16, groups it does not take, uneven act-order groups, zeros outside
    0-255, no kernel). The zero point may be any value: it only enters the per-group offset s (8 - z)."""
    from backends.gptq.quant_linear import sort_by_group
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if not takes(bits, K, N, K if group_size == -1 else group_size):
        return None
    if g_idx is None:
        g_idx = fmt.default_g_idx(K, group_size)
    perm, rows = sort_by_group(g_idx.cpu(), K, group_size)
    if rows is None:
        return None
    kernel_group = kernel_group_size(K, rows)  # rows is the group size `takes` checked (K for one group)
    zeros = fmt.unpack_qzeros(qzeros.cpu(), bits, N, checkpoint_format).to(torch.float32)  # [G, N]
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > 255):  # as make_kernel_layer
        return None
    group_of = _checkpoint_group_of(K, kernel_group, rows)
    s = scales.cpu().to(torch.float32).index_select(0, group_of)
    shift = CODE_OFFSET[bits]
    zeros_k = zeros.index_select(0, group_of) + shift
    packed = torch.cat([_pack_columns(qweight[:, n:n + columns_per_pack].cpu().contiguous(), bits, K, perm, shift)
                        for n in range(0, N, columns_per_pack)])
    offsets = torch.stack([s, s * (8.0 - zeros_k)], -1).to(torch.bfloat16).contiguous()
    return Int4Weight(packed=packed, scales_and_offsets=offsets, group_size=kernel_group,
                      scales=scales.cpu().contiguous(), zeros=zeros.to(torch.uint8).contiguous(), rows=rows,
                      perm=None if perm is None else perm.long(), K=K, N=N, code_offset=shift)


def _pack_columns(qweight: torch.Tensor, bits: int, K: int, perm: torch.Tensor | None, shift: int) -> torch.Tensor:
    """The kernel's packed rows [n, K / 2] of a run of columns (a multiple of 64 wide, or the last). 4-bit words
    are rearranged as they are (`_repack_words`); 2- and 3-bit codes are unpacked to int32 a run at a time, so
    a wide layer (a quantized lm_head) never holds all of them, and packed by torch."""
    if bits == 4:
        return _repack_words(qweight, K, None if perm is None else perm.long())
    codes = fmt.unpack_qweight(qweight, bits, K)  # [K, n]
    if perm is not None:
        codes = codes.index_select(0, perm.long())
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.t() + shift).contiguous().to(torch.int32), 1)


def _repack_words(qweight: torch.Tensor, K: int, perm: torch.Tensor | None) -> torch.Tensor:
    """GPTQ's 4-bit words [K / 8, N] (8 codes along K each) in the kernel's layout (see `_codes_into`), with
    word-wide masks and shifts instead of unpacking to one int32 a code: 9x faster (a 4096x11008 layer in
    0.08 s instead of 0.62), which is most of a 7B model's load. Rows are permuted as byte rows (act-order)."""
    N = qweight.shape[1]
    blocks_end = _whole_blocks(N)
    parts = []
    if blocks_end:
        words = qweight[:, :blocks_end].reshape(K // 8, blocks_end // 64, 2, 32)
        rows = _nibble_rows(words[:, :, 0], words[:, :, 1])  # [K, blocks, 32]
        rows = rows.permute(1, 0, 2)
        parts.append((rows if perm is None else rows.index_select(1, perm)).reshape(-1))
    if N > blocks_end:  # the columns past the last block: adjacent pairs, the even one in the low nibble
        words = qweight[:, blocks_end:]
        rows = _nibble_rows(words[:, 0::2], words[:, 1::2])  # [K, rest / 2]
        parts.append((rows if perm is None else rows.index_select(0, perm)).reshape(-1))
    return torch.cat(parts).view(N, K // 2)


def _nibble_rows(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Bytes [K, ...] holding code k of `low`'s words in the low nibble and of `high`'s in the high one, from
    words [K / 8, ...]: a word's even codes are its bytes' low nibbles, its odd codes their high nibbles."""
    even = (low & 0x0F0F0F0F) | ((high & 0x0F0F0F0F) << 4)
    odd = ((low >> 4) & 0x0F0F0F0F) | (high & ~0x0F0F0F0F)
    as_bytes = [w.contiguous().view(torch.uint8).view(*w.shape, 4) for w in (even, odd)]  # byte i: codes 2i, 2i+1
    rows = torch.stack(as_bytes, -1)  # [K / 8, ..., 4, 2]: k = 8 word + 2 byte + (0 even, 1 odd)
    rows = rows.movedim(-1, 1).movedim(-1, 1)  # [K / 8, 4, 2, ...]
    return rows.reshape(rows.shape[0] * 8, *rows.shape[3:])


def takes(bits: int, K: int, N: int, rows: int) -> bool:
    """Whether make_int4_weight can run a layer of this shape (act-order groups aside)."""
    return bits in WIDTHS and N % 16 == 0 and kernel_group_size(K, rows) is not None and available()
