"""The orders packed GPTQ words are rearranged into at load for the CUDA kernels: same bytes, same rows,
values moved inside each word (or block of three 3-bit words) so a kernel turns a pair of values into two
fp16 numbers with one or two instructions. The checkpoint's own order (format.py) stays on disk."""
from __future__ import annotations

import torch

from backends.gptq import format as fmt


def values_per_block(bits: int) -> int:
    """Values in one packed block: a 32-bit word, or three words at 3 bits (32 values, no value straddling)."""
    return 32 if bits == 3 else 32 // bits


INTERLEAVED_BITS = (2, 3, 4, 8)  # widths whose words are rearranged for the CUDA kernels


def hi_plane_bit(j: int) -> int:
    """Bit of the hi-plane word that holds the third bit of value j (0..31) of a 3-bit block, in the
    planes order of `interleave_pairs`: pair P = j // 2 in half j % 2, P's group of four (P // 4) at
    offset 0, 1, 8 or 9, so one shift per group (<< 2, << 1, >> 6, >> 7) brings a pair's two bits to
    fp16 mantissa bit 2r + 2 (r = P % 4), just above its two low bits."""
    pair, half = j // 2, j % 2
    group = pair // 4
    return (group % 2) + 8 * (group // 2) + 2 * (pair % 4) + 16 * half


def interleave_pairs(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Re-order the values inside each packed word so values 2p and 2p+1 sit in the low and high
    16-bit halves at bit p * bits. Same bytes, same rows: the half2 matrix-vector kernel turns a pair
    into two fp16 numbers with one instruction, and the fp16 activations pair up as they lie in memory.
    3 bits: each block of 32 values (3 words) becomes two words of its low 2 bits in the 2-bit pair order
    (values 0-15, then 16-31) and one word of its third bits (see hi_plane_bit): a 3-bit value then
    straddles no word, and a pair costs one more `lop3` than at 2 or 4 bits. 8 bits: bytes 0-3 hold values
    0, 2, 1, 3 (for mode 8, which reads a pair as bytes 0 and 2 or 1 and 3; the half2 kernels take 2-4 bits)."""
    if bits not in INTERLEAVED_BITS:
        raise ValueError(f"pair interleaving is for {INTERLEAVED_BITS}-bit words, not {bits}")
    if bits == 3:
        return _split_planes3(qweight)
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(words)
    mask = (1 << bits) - 1
    for j in range(32 // bits):
        out |= ((words >> (j * bits)) & mask) << ((j % 2) * 16 + (j // 2) * bits)
    return _as_int32(out)


def fields3_place(j: int) -> list[tuple[int, int, int]]:
    """Where value j (0..31) of a 3-bit block sits in the fields order of `fields3`, as (word, bit, value
    bit) triples: pair p = j // 2 (half j % 2) of pairs 0-14 is a whole field at bit 3 (p % 5) of word p // 5's
    half; pair 15's values are split over bit 15 of the three words' halves (word e holds value bit e)."""
    pair, half = j // 2, j % 2
    if pair < 15:
        return [(pair // 5, 16 * half + 3 * (pair % 5) + e, e) for e in range(3)]
    return [(e, 16 * half + 15, e) for e in range(3)]


def fields3(qweight: torch.Tensor) -> torch.Tensor:
    """3-bit words in the fields order (`fields3_place`) for mode 8: each block of 32 values is three
    words holding five whole 3-bit fields in each 16-bit half (bits 0, 3, 6, 9 and 12) and, in bit 15 of
    the six halves, the three bits of the last pair. Same bytes as the checkpoint. A pair is then one `and`
    (fields at bits 0-8 are fp16 subnormals as they lie) or an `and` after a shift by 9 shared by the word,
    where the planes order (`interleave_pairs`) needs a second `lop3` a pair to or in the third bit: mode 8's
    3-bit loop went from 2.27 to 1.54 SASS instructions per weight and its one-row time on 8192x28672 from 36.1
    to 29.0 us on an H200 (bench/RESULTS.md, 2026-12-05)."""
    K, N = qweight.shape[0] * 32 // 3, qweight.shape[1]
    blocks = fmt.unpack_qweight(qweight, 3, K).to(torch.int64).view(K // 32, 32, N)
    words = [torch.zeros(K // 32, N, dtype=torch.int64, device=qweight.device) for _ in range(3)]
    for j in range(32):
        for word, bit, value_bit in fields3_place(j):
            words[word] |= ((blocks[:, j] >> value_bit) & 1) << bit
    return _as_int32(torch.stack(words, 1).view(K // 32 * 3, N))


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _split_planes3(qweight: torch.Tensor) -> torch.Tensor:
    K, N = qweight.shape[0] * 32 // 3, qweight.shape[1]
    blocks = fmt.unpack_qweight(qweight, 3, K).to(torch.int64).view(K // 32, 32, N)
    lo, hi = blocks & 3, blocks >> 2
    a, b, h = (torch.zeros(K // 32, N, dtype=torch.int64, device=qweight.device) for _ in range(3))
    for j in range(16):
        a |= lo[:, j] << ((j % 2) * 16 + (j // 2) * 2)
        b |= lo[:, 16 + j] << ((j % 2) * 16 + (j // 2) * 2)
    for j in range(32):
        h |= hi[:, j] << hi_plane_bit(j)
    return _as_int32(torch.stack([a, b, h], 1).view(K // 32 * 3, N))
