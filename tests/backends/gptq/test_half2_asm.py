"""The inline PTX of the half2 matrix-vector kernel, executed instruction by instruction by a small
interpreter of the few PTX instructions it uses (CPU machines cannot run PTX, and the Triton
interpreter runs the kernel's portable form instead). This checks the bit tricks themselves: lop3
masks, the fp16 magic numbers, the per-pair fix-ups and the operand numbering, on the exact asm text
of backends/gptq/triton_kernels.py. Whether a GPU executes them as PTX specifies is for bench.kernels
(every case is checked against a float64 reference before timing) and the tuner's output check."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

SOURCE = Path(__file__).resolve().parents[3] / "backends" / "gptq" / "triton_kernels.py"


def _asm_call(function: str) -> ast.Call:
    """The inline_asm_elementwise call inside `function` of triton_kernels.py."""
    tree = ast.parse(SOURCE.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    return next(n for n in ast.walk(fn)
                if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "inline_asm_elementwise")


def asm_of(function: str) -> tuple[str, str]:
    """(asm text, constraints) of the inline_asm_elementwise call inside `function`."""
    call = _asm_call(function)
    return call.args[0].value, call.args[1].value


def f16_pair(word: int) -> tuple[np.float16, np.float16]:
    return (np.array([word & 0xFFFF], np.uint16).view(np.float16)[0],
            np.array([(word >> 16) & 0xFFFF], np.uint16).view(np.float16)[0])


def pack_f16(lo, hi) -> int:
    a = np.array([lo, hi], np.float16).view(np.uint16)
    return int(a[0]) | (int(a[1]) << 16)


def run_ptx(asm: str, args: list[int], outputs: int = 1):
    """Execute the straight-line PTX `asm` with $1.. = args (32-bit words) after `outputs` output
    operands; return $0 as float32 (or the outputs' values when there are several)."""
    regs: dict[str, object] = {f"${i + outputs}": a & 0xFFFFFFFF for i, a in enumerate(args)}

    def val(tok: str):
        tok = tok.strip()
        if tok.startswith("0x") or tok.isdigit():
            return int(tok, 0)
        return regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        if op == "mov.b32" and rest.lstrip().startswith("{"):
            dst, src = re.match(r"\{\s*([\w$]+),\s*([\w$]+)\s*\},\s*(\S+)", rest.strip()).group(1, 2), rest.split(",")[-1]
            word = val(src)
            regs[dst[0]], regs[dst[1]] = f16_pair(word)
            continue
        ops = [t.strip() for t in rest.split(",")]
        d = ops[0]
        if op == "mov.b32":
            regs[d] = val(ops[1])
        elif op == "shr.u32":
            regs[d] = (val(ops[1]) >> val(ops[2])) & 0xFFFFFFFF
        elif op == "shl.b32":
            regs[d] = (val(ops[1]) << val(ops[2])) & 0xFFFFFFFF
        elif op == "lop3.b32":
            a, b, c, lut = (val(t) for t in ops[1:5])
            out = 0
            for bit in range(32):
                idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                out |= ((lut >> idx) & 1) << bit
            regs[d] = out
        elif op in ("sub.f16x2", "mul.f16x2", "fma.rn.f16x2"):
            xs = [f16_pair(val(t)) for t in ops[1:]]
            halves = []
            for h in range(2):
                v = [float(x[h]) for x in xs]
                exact = v[0] - v[1] if op.startswith("sub") else v[0] * v[1] if op.startswith("mul") else v[0] * v[1] + v[2]
                halves.append(np.float16(exact))  # one rounding, as .rn specifies (float64 is exact here)
            regs[d] = pack_f16(*halves)
        elif op == "add.rn.f16":  # one fp16 half (.b16 registers hold np.float16)
            regs[d] = np.float16(float(val(ops[1])) + float(val(ops[2])))
        elif op == "add.rn.f16x2":
            a, b = f16_pair(val(ops[1])), f16_pair(val(ops[2]))
            regs[d] = pack_f16(np.float16(float(a[0]) + float(b[0])), np.float16(float(a[1]) + float(b[1])))
        elif op == "cvt.f32.f16":
            regs[d] = np.float32(val(ops[1]))
        elif op == "add.f32":
            regs[d] = np.float32(np.float32(val(ops[1])) + np.float32(val(ops[2])))
        else:
            raise AssertionError(f"instruction the test interpreter does not know: {line}")
    if outputs > 1:
        return [float(regs[f"${i}"]) for i in range(outputs)]
    return float(regs["$0"])


def interleaved_word(values: list[int], bits: int) -> int:
    word = 0
    for j, v in enumerate(values):
        word |= v << ((j % 2) * 16 + (j // 2) * bits)
    return word


def half2_of(value: float) -> int:
    return pack_f16(np.float16(value), np.float16(value))


def worst_relative_error(asm: str, bits: int, values: int, words, seed: int) -> float:
    """Worst |asm - exact| / sum |x (q - z)| over 300 random blocks of `values` codes (and blocks at the
    code extremes); words(q) packs a block into the asm's word operands, which precede the x pairs."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for trial in range(300):
        q = [int(v) for v in rng.integers(0, 2 ** bits, values)]
        z = int(rng.integers(0, 2 ** bits))
        if trial % 50 == 0:  # edges: all codes at the extremes
            q = [2 ** bits - 1 if trial % 100 else 0] * values
        x = rng.standard_normal(values).astype(np.float16) * np.float16(rng.choice([0.01, 1.0, 30.0]))
        xpairs = [pack_f16(x[2 * p], x[2 * p + 1]) for p in range(values // 2)]
        zz = (z + 0x6400) * 0x10001
        if bits == 4:
            consts = [zz, half2_of(-(64 + z))]
        else:  # 2 bits, and the low two bits of 3-bit values: fields at mantissa bits 0, 2, 4, 6
            consts = [zz, half2_of(-(256 + z)), half2_of(-(64 + z)), half2_of(-(16 + z))]
        got = run_ptx(asm, words(q) + xpairs + consts)
        exact = sum(float(x[j]) * (q[j] - z) for j in range(values))
        scale = sum(abs(float(x[j]) * (q[j] - z)) for j in range(values)) + 1e-6
        worst = max(worst, abs(got - exact) / scale)
    return worst


def test_asm_computes_the_dot_product_of_one_2bit_word():
    asm, constraints = asm_of("_dot_word2")
    assert constraints.count("r") == 1 + 8 + 4  # word, x pairs, zero constants
    worst = worst_relative_error(asm, 2, 16, lambda q: [interleaved_word(q, 2)], seed=2)
    assert worst < 4e-3, worst  # fp16 products and sums: a wrong mask or constant gives errors of order 1


def test_asm_computes_the_dot_product_of_two_4bit_words():
    """_dot_words4: one fp16 chain over two consecutive words (values 0-7 in the first, 8-15 in the
    second; swapped words or x pairs give errors of order 1)."""
    asm, constraints = asm_of("_dot_words4")
    assert constraints.count("r") == 2 + 8 + 2  # words, x pairs, zero constants
    worst = worst_relative_error(asm, 4, 16, lambda q: [interleaved_word(q[:8], 4), interleaved_word(q[8:], 4)],
                                 seed=4)
    assert worst < 4e-3, worst


def test_asm_computes_the_dot_product_of_one_3bit_block():
    """_dot_block3: 32 values as two 2-bit pair-order words and a word of third bits (hi_plane_bit)."""
    from backends.gptq.word_order import hi_plane_bit
    asm, constraints = asm_of("_dot_block3")
    assert constraints.count("r") == 3 + 16 + 4  # words, x pairs, zero constants

    def planes(q):
        return [interleaved_word([v & 3 for v in q[:16]], 2), interleaved_word([v & 3 for v in q[16:]], 2),
                sum((v >> 2) << hi_plane_bit(j) for j, v in enumerate(q))]

    worst = worst_relative_error(asm, 3, 32, planes, seed=3)
    assert worst < 4e-3, worst


def test_4bit_chain_keeps_activation_outliers_finite():
    """Activation outliers (x = 2000 in two channels of a block, as LLMs' down projections see) times the
    largest code distance 15: 30000 in each fp16 half, 60000 once the halves are added (fp16 holds
    65504), plus the block's other products. The result stays finite and right to fp16 rounding."""
    asm, _ = asm_of("_dot_words4")
    rng = np.random.default_rng(7)
    q = [int(v) for v in rng.integers(0, 16, 16)]
    q[0] = q[1] = 15
    x = (rng.standard_normal(16) * 0.5).astype(np.float16)
    x[0] = x[1] = np.float16(2000)  # value 0 is in the low half, 1 in the high half
    xpairs = [pack_f16(x[2 * p], x[2 * p + 1]) for p in range(8)]
    consts = [(0 + 0x6400) * 0x10001, half2_of(-64.0)]  # z = 0
    got = run_ptx(asm, [interleaved_word(q[:8], 4), interleaved_word(q[8:], 4)] + xpairs + consts)
    exact = sum(float(x[j]) * q[j] for j in range(16))
    assert np.isfinite(got) and abs(got - exact) / exact < 1e-3, (got, exact)


def asm_for_pair(function: str, P: int, **constexprs) -> str:
    """The asm text of the tensor-core kernel's pair unpacker `function` for pair P (and its other
    constexprs): its f-strings evaluated as Triton does when they are constexprs."""
    text = ast.Expression(_asm_call(function).args[0])
    return eval(compile(text, str(SOURCE), "eval"), {"P": P, "R": P, **constexprs})


@pytest.mark.parametrize("bits", [4, 2])
def test_pair_unpackers_give_exact_codes_minus_zero(bits):
    """_pair_h at 4 and 2 bits (the 16-row tensor-core kernel's unpacking): for every pair of a word,
    every zero and random codes, the two fp16 outputs are exactly q - z (a wrong mask, shift or fix-up
    constant gives another integer)."""
    pairs = 16 // bits
    rng = np.random.default_rng(bits)
    for P in range(pairs):
        asm = asm_for_pair("_pair_h", P, BITS=bits)
        for _ in range(60):
            q = [int(v) for v in rng.integers(0, 2 ** bits, 32 // bits)]
            z = int(rng.integers(0, 2 ** bits))
            r = bits * P % 8  # the pair's bit within its byte
            fix = half2_of(-(1024 / 2 ** r + z))
            lo, hi = run_ptx(asm, [interleaved_word(q, bits), fix], outputs=2)
            assert (lo, hi) == (q[2 * P] - z, q[2 * P + 1] - z), (P, q, z)


def test_3bit_pair_unpacker_gives_exact_codes_minus_zero():
    """_pair3_h: each of the four groups of eight values of a 3-bit block (planes order), fed as the
    kernel feeds it (the low-bit word, shifted by a byte for the second group of a word, and the
    third-bit word shifted per group), gives exactly q - z for both values of every pair."""
    from backends.gptq.word_order import hi_plane_bit
    rng = np.random.default_rng(3)
    mask = 0xFFFFFFFF
    for _ in range(40):
        q = [int(v) for v in rng.integers(0, 8, 32)]
        z = int(rng.integers(0, 8))
        w0 = interleaved_word([v & 3 for v in q[:16]], 2)
        w1 = interleaved_word([v & 3 for v in q[16:]], 2)
        h = sum((v >> 2) << hi_plane_bit(j) for j, v in enumerate(q))
        groups = [(w0, (h << 2) & mask), (w0 >> 8, (h << 1) & mask), (w1, h >> 6), (w1 >> 8, h >> 7)]
        for group, (lo, hi) in enumerate(groups):
            for R in range(4):
                got = run_ptx(asm_for_pair("_pair3_h", R), [lo, hi, half2_of(-(1024 / 4 ** R + z))], outputs=2)
                j = 8 * group + 2 * R
                assert got == [q[j] - z, q[j + 1] - z], (group, R, q, z)


def test_fix_up_bit_patterns_match_fp16():
    """_fixups_2bit and _negative_1024_plus_z build -(1024 / 4^r + z) as integer bit patterns: equal to the
    fp16 value for every zero a 2/3/4-bit checkpoint can hold (0..15)."""
    for z in range(16):
        assert (z + 0x6400) * 0x10001 == half2_of(1024 + z)
        assert (0xE400 + z) * 0x10001 == half2_of(-(1024 + z))
        assert (0xDC00 + 4 * z) * 0x10001 == half2_of(-(256 + z))
        assert (0xD400 + 16 * z) * 0x10001 == half2_of(-(64 + z))
        assert (0xCC00 + 64 * z) * 0x10001 == half2_of(-(16 + z))
    source = SOURCE.read_text()  # the kernels build exactly these
    for text in ("(z + 0x6400) * 0x10001", "(0xDC00 + 4 * z) * 0x10001", "(0xD400 + 16 * z) * 0x10001",
                 "(0xCC00 + 64 * z) * 0x10001", "(0xE400 + z.to(tl.uint32)) * 0x10001"):
        assert text in source, text


def test_fix_ups_are_exact_integers():
    """(1024 + q * 2^s) * 2^-s - (1024 * 2^-s + z) is exactly q - z in fp16 for every code, zero and shift used."""
    for bits, shifts in ((4, (0, 4)), (2, (0, 2, 4, 6)), (3, (0, 2, 4, 6))):
        for s in shifts:
            for q in range(2 ** bits):
                for z in range(2 ** bits):
                    magic = np.float16(1024 + q * 2 ** s)
                    assert float(magic) == 1024 + q * 2 ** s
                    fixed = np.float16(float(magic) * 2.0 ** -s - float(np.float16(1024 * 2.0 ** -s + z)))
                    assert float(fixed) == q - z
