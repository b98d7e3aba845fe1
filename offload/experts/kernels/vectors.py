"""AVX2 vectors in numba: 8 x int32 and 8 x float32 values that live in ymm registers, and the byte dot products
llama.cpp's AVX2 kernels are built from (``vpmaddubsw`` then ``vpmaddwd``: 32 multiply-adds in two instructions).

LLVM does not find ``vpmaddubsw`` in a plain integer loop (it widens both sides to 16 bits and uses ``vpmaddwd``,
half the rate), and a dot that returns a scalar pays a horizontal sum per block. So the kernels (rows.py) carry
``i32x8`` / ``f32x8`` values across their loops: numba types backed by LLVM vector types, made and combined only by
the intrinsics here, which LLVM keeps in registers. Per 32 bytes of int8 weights: two loads, two ``vpsignb``, one
``vpmaddubsw``, one ``vpmaddwd``, one add.

Only compiled where the target has AVX2 (``AVX2``): elsewhere rows.py uses its portable loops, which LLVM
vectorizes for that CPU (SSE2, NEON, ...), and these intrinsics are never typed.
"""

from __future__ import annotations

from llvmlite import binding, ir
from numba import types
from numba.core import config
from numba.extending import intrinsic, models, register_model

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
V16I8, V32I8, V16I16, V8I32, V8F32 = (ir.VectorType(I8, 16), ir.VectorType(I8, 32), ir.VectorType(I16, 16),
                                      ir.VectorType(I32, 8), ir.VectorType(F32, 8))


def target_features() -> str:
    """The CPU features numba compiles for (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES override the host's)."""
    return (config.CPU_FEATURES if config.CPU_NAME else binding.get_host_cpu_features().flatten()) or ""


AVX2 = "+avx2" in target_features().split(",")


class Vector(types.Type):
    """A numba type whose value is one LLVM vector (passed and kept in a register)."""

    def __init__(self, llvm_type: ir.VectorType, name: str) -> None:
        self.llvm_type = llvm_type
        super().__init__(name=name)


i32x8 = Vector(V8I32, "i32x8")
f32x8 = Vector(V8F32, "f32x8")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type)


def _declare(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    f = builder.module.globals.get(name)
    return f if f is not None else ir.Function(builder.module, ir.FunctionType(ret, args), name=name)


def _load(ctx, builder, arrty, arr, offset, vector: ir.VectorType, align: int):
    """The vector at element ``offset`` of a numba array (unaligned loads are full speed on AVX2 CPUs)."""
    data = builder.gep(ctx.make_array(arrty)(ctx, builder, arr).data, [offset])
    return builder.load(builder.bitcast(data, vector.as_pointer()), align=align)


def _madd(builder: ir.IRBuilder, unsigned, signed):
    """u8 x s8 products summed in pairs, as int16 (no saturation while |u| <= 128 and |s| <= 127)."""
    ubs = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, [V32I8, V32I8])
    return builder.call(ubs, [unsigned, signed])


def _to_int32(builder: ir.IRBuilder, pairs):
    """int16 x 16 summed in pairs into int32 x 8."""
    wd = _declare(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16])
    return builder.call(wd, [pairs, ir.Constant(V16I16, [1] * 16)])


@intrinsic
def dot_int8(typingctx, w, wi, x, xi):
    """w[wi:wi+32] (int8) . x[xi:xi+32] (int8 codes, |x| <= 127) as 8 int32 partial sums (1-D arrays)."""

    def codegen(ctx, builder, sig, args):
        wv = _load(ctx, builder, sig.args[0], args[0], args[1], V32I8, 1)
        xv = _load(ctx, builder, sig.args[2], args[2], args[3], V32I8, 1)
        sign = _declare(builder, "llvm.x86.avx2.psign.b", V32I8, [V32I8, V32I8])
        # |w| (unsigned) times x carrying w's sign: pmaddubsw wants one unsigned side (llama.cpp's mul_sum_i8_pairs)
        return _to_int32(builder, _madd(builder, builder.call(sign, [wv, wv]), builder.call(sign, [xv, wv])))

    return i32x8(w, types.intp, x, types.intp), codegen


@intrinsic
def dot_int4(typingctx, w, xe, xo, i):
    """Nibble bytes w[i:i+32] (64 inputs: low nibble even, high odd) . xe[i:i+32] / xo[i:i+32] as 8 int32 sums.
    Lanes 0-3 hold bytes i..i+15, lanes 4-7 bytes i+16..i+31 (sums4 relies on it)."""

    def codegen(ctx, builder, sig, args):
        wv = _load(ctx, builder, sig.args[0], args[0], args[3], V32I8, 1)
        return _nibble_dot(ctx, builder, sig, args, wv, 1, 3)

    return i32x8(w, xe, xo, types.intp), codegen


def _nibble_dot(ctx, builder, sig, args, wv, xe: int, at: int):
    """32 nibble bytes wv: low nibbles . args[xe][at:], high nibbles . args[xe + 1][at:], as 8 int32 sums."""
    low, high = _nibbles(builder, wv, False), _nibbles(builder, wv, True)
    xl = _load(ctx, builder, sig.args[xe], args[xe], args[at], V32I8, 1)
    xh = _load(ctx, builder, sig.args[xe + 1], args[xe + 1], args[at], V32I8, 1)
    pairs = builder.add(_madd(builder, low, xl), _madd(builder, high, xh))  # |15 * 127 * 4| fits int16
    return _to_int32(builder, pairs)


@intrinsic
def dot_q4_0(typingctx, w, first, second, xl, xh, i):
    """Two Q4_0 blocks' 16 nibble bytes, at w[first:] and w[second:] (element j low, j + 16 high), against their
    activations' first halves xl[i:i+32] and second halves xh[i:i+32]: lanes 0-3 the first block, 4-7 the second."""

    def codegen(ctx, builder, sig, args):
        halves = [_load(ctx, builder, sig.args[0], args[0], args[k], V16I8, 1) for k in (1, 2)]
        wv = builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        return _nibble_dot(ctx, builder, sig, args, wv, 3, 5)

    return i32x8(w, types.intp, types.intp, xl, xh, types.intp), codegen


MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 codes' values, doubled (ggml's)


def _mxfp4_dot(ctx, builder, sig, args, wv, xe: int, at: int):
    """32 bytes wv of E2M1 code pairs: each nibble looked up (vpshufb) as its doubled value -12..12, low nibbles
    . args[xe][at:at+32], high nibbles . args[xe + 1][at:], signed as llama.cpp does (vpsignb twice); 8 int32 sums,
    lanes 0-3 from bytes 0-15, 4-7 from bytes 16-31."""
    b = builder
    table = ir.Constant(V32I8, [v & 0xFF for v in MXFP4_VALUES] * 2)
    lookup = _declare(b, "llvm.x86.avx2.pshuf.b", V32I8, [V32I8, V32I8])
    sign = _declare(b, "llvm.x86.avx2.psign.b", V32I8, [V32I8, V32I8])
    pairs = None
    for high, xi in ((False, xe), (True, xe + 1)):
        v = b.call(lookup, [table, _nibbles(b, wv, high)])
        xv = _load(ctx, b, sig.args[xi], args[xi], args[at], V32I8, 1)
        madd = _madd(b, b.call(sign, [v, v]), b.call(sign, [xv, v]))  # |v| <= 12: |pair| <= 3048
        pairs = madd if pairs is None else b.add(pairs, madd)
    return _to_int32(b, pairs)


@intrinsic
def dot_mxfp4(typingctx, w, first, second, xl, xh, i):
    """Two GGUF MXFP4 blocks' 16 code bytes (element j low, j + 16 high, as Q4_0), at w[first:] and w[second:],
    against their activations' halves xl[i:i+32] / xh[i:i+32]: lanes 0-3 the first block, 4-7 the second."""

    def codegen(ctx, builder, sig, args):
        halves = [_load(ctx, builder, sig.args[0], args[0], args[k], V16I8, 1) for k in (1, 2)]
        wv = builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        return _mxfp4_dot(ctx, builder, sig, args, wv, 3, 5)

    return i32x8(w, types.intp, types.intp, xl, xh, types.intp), codegen


@intrinsic
def dot_mxfp4_plain(typingctx, w, xe, xo, i):
    """Code bytes w[i:i+32] as gpt-oss's safetensors hold them (two blocks of 16 bytes, low nibble the even input,
    high the odd one) . xe[i:i+32] / xo[i:i+32] (the even / odd inputs' codes): lanes 0-3 the first block."""

    def codegen(ctx, builder, sig, args):
        wv = _load(ctx, builder, sig.args[0], args[0], args[3], V32I8, 1)
        return _mxfp4_dot(ctx, builder, sig, args, wv, 1, 3)

    return i32x8(w, xe, xo, types.intp), codegen


def e8m0_half_bits(builder: ir.IRBuilder, e, float_type: ir.Type):
    """E8M0 exponents e (int32, or a vector of them) -> 2^(e - 128) of ``float_type``: half an MXFP4 block's scale
    2^(e - 127), as ggml's ggml_e8m0_to_fp32_half (the values are kept doubled); e < 2 gives the subnormals."""
    def const(value: int):
        return ir.Constant(e.type, [value] * e.type.count if isinstance(e.type, ir.VectorType) else value)

    small = builder.icmp_unsigned("<", e, const(2))
    subnormal = builder.shl(const(0x00200000), e)
    normal = builder.shl(builder.sub(e, const(1)), const(23))
    return builder.bitcast(builder.select(small, subnormal, normal), float_type)


@intrinsic
def load8_e8m0_half(typingctx, arr, i):
    """Eight E8M0 exponent bytes arr[i:i+8] (uint8) as 2^(e - 128) each, f32x8 (intrinsics.e8m0_half, lane-wise)."""

    def codegen(ctx, builder, sig, args):
        e = builder.zext(_load(ctx, builder, sig.args[0], args[0], args[1], ir.VectorType(I8, 8), 1), V8I32)
        return e8m0_half_bits(builder, e, V8F32)

    return f32x8(arr, types.intp), codegen


def _nibbles(builder: ir.IRBuilder, wv, high: bool):
    """The low (or high) nibble of each of 32 bytes, as bytes 0..15 (shifted in 16-bit lanes, then masked)."""
    if high:
        wv = builder.bitcast(builder.lshr(builder.bitcast(wv, V16I16), ir.Constant(V16I16, [4] * 16)), V32I8)
    return builder.and_(wv, ir.Constant(V32I8, [15] * 32))


def _nibble_block_dot(high: bool):
    def dot(typingctx, w, wi, x, xi):
        def codegen(ctx, builder, sig, args):
            wv = _nibbles(builder, _load(ctx, builder, sig.args[0], args[0], args[1], V32I8, 1), high)
            xv = _load(ctx, builder, sig.args[2], args[2], args[3], V32I8, 1)
            return _to_int32(builder, _madd(builder, wv, xv))

        return i32x8(w, types.intp, x, types.intp), codegen

    dot.__doc__ = f"""The {'high' if high else 'low'} nibbles of bytes w[wi:wi+32] (codes 0..15) . x[xi:xi+32] (int8)
    as 8 int32 partial sums: one Q4_K sub-block of 32 (the low nibbles of a 32-byte run hold 32 inputs, the high
    ones the next 32)."""
    return intrinsic(dot)


dot_low_nibbles, dot_high_nibbles = _nibble_block_dot(False), _nibble_block_dot(True)


@intrinsic
def dot_q6_k(typingctx, w, low, high, shift, x, xi):
    """32 Q6_K codes (0..63, value q - 32): 4 bits from w[low:low+32] (the low nibble, or the high one when
    ``shift`` >= 4) and 2 bits from w[high:high+32] at bit ``shift`` (0, 2, 4, 6; ggml pairs them so), against
    x[xi:xi+32] as 8 int32 sums: lanes 0-3 the first 16 inputs, 4-7 the next 16 (two sub-blocks, as sums4 takes)."""

    def codegen(ctx, builder, sig, args):
        b = builder
        lv = _load(ctx, b, sig.args[0], args[0], args[1], V32I8, 1)
        hv = _load(ctx, b, sig.args[0], args[0], args[2], V32I8, 1)
        count = b.trunc(args[3], I16)
        shift = b.shuffle_vector(b.insert_element(ir.Constant(V16I16, None), count, ir.Constant(I32, 0)),
                                 ir.Constant(V16I16, None), ir.Constant(ir.VectorType(I32, 16), [0] * 16))
        four = b.icmp_unsigned(">=", count, ir.Constant(I16, 4))
        low = b.select(four, _nibbles(b, lv, True), _nibbles(b, lv, False))
        two = b.and_(b.bitcast(b.lshr(b.bitcast(hv, V16I16), shift), V32I8), ir.Constant(V32I8, [3] * 32))
        q = b.sub(b.or_(low, b.shl(two, ir.Constant(V32I8, [4] * 32))), ir.Constant(V32I8, [32] * 32))
        sign = _declare(b, "llvm.x86.avx2.psign.b", V32I8, [V32I8, V32I8])
        xv = _load(ctx, b, sig.args[4], args[4], args[5], V32I8, 1)
        return _to_int32(b, _madd(b, b.call(sign, [q, q]), b.call(sign, [xv, q])))

    return i32x8(w, types.intp, types.intp, types.intp, x, types.intp), codegen


@intrinsic
def load4_pairs(typingctx, arr, i):
    """arr[i], arr[i], arr[i+1], arr[i+1], ..., arr[i+3] of a float32 array as f32x8 (one scale per two lanes)."""

    def codegen(ctx, builder, sig, args):
        four = _load(ctx, builder, sig.args[0], args[0], args[1], ir.VectorType(F32, 4), 4)
        return builder.shuffle_vector(four, four, ir.Constant(V8I32, [0, 0, 1, 1, 2, 2, 3, 3]))

    return f32x8(arr, types.intp), codegen


def _k4_field(mins: bool):
    """Q4_K's eight 6-bit scales (or mins) of the block at w[at:], from its 12 packed bytes at at + 4, as f32x8.
    Lanes 0-3: the low 6 bits of bytes 0-3 (mins: 4-7); lanes 4-7: 4 bits of bytes 8-11 (mins: their high
    nibbles) under the top 2 bits of bytes 0-3 (mins: 4-7), ggml's get_scale_min_k4."""

    def field(typingctx, w, at):
        def codegen(ctx, builder, sig, args):
            b = builder
            start = b.add(args[1], ir.Constant(args[1].type, 4))
            v = _load(ctx, b, sig.args[0], args[0], start, V16I8, 1)

            def lanes(order):
                return b.zext(b.shuffle_vector(v, v, ir.Constant(V8I32, order)), V8I32)

            def const(values):
                return ir.Constant(V8I32, values)

            low = lanes([4, 5, 6, 7, 8, 9, 10, 11] if mins else [0, 1, 2, 3, 8, 9, 10, 11])
            top = lanes([4, 5, 6, 7, 4, 5, 6, 7] if mins else [0, 1, 2, 3, 0, 1, 2, 3])
            if mins:
                low = b.lshr(low, const([0, 0, 0, 0, 4, 4, 4, 4]))
            low = b.and_(low, const([63] * 4 + [15] * 4))
            high = b.and_(b.shl(b.lshr(top, const([6] * 8)), const([4] * 8)), const([0] * 4 + [48] * 4))
            return b.sitofp(b.or_(low, high), V8F32)

        return f32x8(w, types.intp), codegen

    return intrinsic(field)


k4_scales, k4_mins = _k4_field(False), _k4_field(True)


@intrinsic
def store8(typingctx, arr, i, v):
    """arr[i:i+8] = v for a float32 array."""

    def codegen(ctx, builder, sig, args):
        data = builder.gep(ctx.make_array(sig.args[0])(ctx, builder, args[0]).data, [args[1]])
        builder.store(args[2], builder.bitcast(data, V8F32.as_pointer()), align=4)
        return ctx.get_dummy_value()

    return types.none(arr, types.intp, f32x8), codegen


@intrinsic
def load8_int8(typingctx, arr, i):
    """Bytes arr[i:i+8] of a uint8 array, read as int8, as f32x8 (Q6_K's sub-block scales)."""

    def codegen(ctx, builder, sig, args):
        bytes8 = _load(ctx, builder, sig.args[0], args[0], args[1], ir.VectorType(I8, 8), 1)
        return builder.sitofp(bytes8, V8F32)

    return f32x8(arr, types.intp), codegen


@intrinsic
def vec8(typingctx, a, b, c, d, e, f, g, h):
    """Eight float32 scalars as one f32x8."""
    sig = f32x8(*[types.float32] * 8)

    def codegen(ctx, builder, sig, args):
        v = ir.Constant(V8F32, None)
        for lane, value in enumerate(args):
            v = builder.insert_element(v, value, ir.Constant(I32, lane))
        return v

    return sig, codegen


def _hadd(builder: ir.IRBuilder, a, b):
    """Adjacent pairs of a and b summed, per 128-bit half (vphaddd's order)."""
    even = builder.shuffle_vector(a, b, ir.Constant(V8I32, [0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(a, b, ir.Constant(V8I32, [1, 3, 9, 11, 5, 7, 13, 15]))
    return builder.add(even, odd)


@intrinsic
def sums8(typingctx, d0, d1, d2, d3, d4, d5, d6, d7):
    """Lane j = the sum of d_j's 8 lanes: eight blocks' dots reduced in 7 shuffles-and-adds, not 8 x 5."""
    sig = i32x8(*[i32x8] * 8)

    def codegen(ctx, builder, sig, args):
        b = builder
        first = _hadd(b, _hadd(b, args[0], args[1]), _hadd(b, args[2], args[3]))
        second = _hadd(b, _hadd(b, args[4], args[5]), _hadd(b, args[6], args[7]))
        low = b.shuffle_vector(first, second, ir.Constant(V8I32, [0, 1, 2, 3, 8, 9, 10, 11]))
        high = b.shuffle_vector(first, second, ir.Constant(V8I32, [4, 5, 6, 7, 12, 13, 14, 15]))
        return b.add(low, high)

    return sig, codegen


@intrinsic
def sums4(typingctx, d0, d1, d2, d3):
    """Lane j = block j's sum, where d_i's lanes 0-3 are block 2i and lanes 4-7 block 2i + 1 (int4 groups of 32)."""
    sig = i32x8(*[i32x8] * 4)

    def codegen(ctx, builder, sig, args):
        b = builder
        mixed = _hadd(b, _hadd(b, args[0], args[1]), _hadd(b, args[2], args[3]))  # blocks 0 2 4 6 | 1 3 5 7
        return b.shuffle_vector(mixed, mixed, ir.Constant(V8I32, [0, 4, 1, 5, 2, 6, 3, 7]))

    return sig, codegen


@intrinsic
def load8(typingctx, arr, i):
    """arr[i:i+8] of a float32 array as f32x8."""

    def codegen(ctx, builder, sig, args):
        return _load(ctx, builder, sig.args[0], args[0], args[1], V8F32, 4)

    return f32x8(arr, types.intp), codegen


@intrinsic
def izero(typingctx):
    return i32x8(), lambda ctx, builder, sig, args: ir.Constant(V8I32, None)


@intrinsic
def fzero(typingctx):
    return f32x8(), lambda ctx, builder, sig, args: ir.Constant(V8F32, None)


@intrinsic
def iadd(typingctx, a, b):
    return i32x8(i32x8, i32x8), lambda ctx, builder, sig, args: builder.add(*args)


@intrinsic
def fmul(typingctx, a, b):
    return f32x8(f32x8, f32x8), lambda ctx, builder, sig, args: builder.fmul(*args)


def _fma(builder: ir.IRBuilder, a, b, c):
    return builder.call(_declare(builder, "llvm.fma.v8f32", V8F32, [V8F32] * 3), [a, b, c])


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c, lane by lane."""
    return f32x8(f32x8, f32x8, f32x8), lambda ctx, builder, sig, args: _fma(builder, *args)


@intrinsic
def splat(typingctx, value):
    """A float32 in all 8 lanes."""

    def codegen(ctx, builder, sig, args):
        one = builder.insert_element(ir.Constant(V8F32, None), args[0], ir.Constant(I32, 0))
        return builder.shuffle_vector(one, ir.Constant(V8F32, None), ir.Constant(V8I32, [0] * 8))

    return f32x8(types.float32), codegen


@intrinsic
def itotal(typingctx, d):
    """The sum of an i32x8's lanes."""

    def codegen(ctx, builder, sig, args):
        return _tree(builder, builder.add, args[0])

    return types.int32(i32x8), codegen


def _tree(builder: ir.IRBuilder, add, vector):
    lanes = [builder.extract_element(vector, ir.Constant(I32, i)) for i in range(8)]
    while len(lanes) > 1:
        lanes = [add(a, b) for a, b in zip(lanes[::2], lanes[1::2], strict=True)]
    return lanes[0]


@intrinsic
def to_float(typingctx, d):
    return f32x8(i32x8), lambda ctx, builder, sig, args: builder.sitofp(args[0], V8F32)


@intrinsic
def total(typingctx, v):
    """The sum of an f32x8's lanes."""

    def codegen(ctx, builder, sig, args):
        return _tree(builder, builder.fadd, args[0])

    return types.float32(f32x8), codegen
