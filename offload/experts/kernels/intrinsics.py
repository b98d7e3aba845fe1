"""LLVM operations numba cannot spell: half-float widening, atomics and a spin-wait hint.

Each function is a numba ``@intrinsic`` emitting a few lines of LLVM IR through llvmlite; rows.py and pool.py
call them inside ``@njit`` code, where LLVM inlines them. The AVX2 vectors and dot products are in vectors.py.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from offload.experts.kernels.vectors import e8m0_half_bits, target_features

I16, I32 = ir.IntType(16), ir.IntType(32)


def _declare(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    f = builder.module.globals.get(name)
    return f if f is not None else ir.Function(builder.module, ir.FunctionType(ret, args), name=name)


def _pointer(ctx, builder, arrty, arr, offset):
    """Pointer to element ``offset`` of a numba array."""
    return builder.gep(ctx.make_array(arrty)(ctx, builder, arr).data, [offset])


def _widen(to_float):
    def widen(typingctx, bits):
        sig = types.float32(bits)

        def codegen(ctx, builder, sig, args):
            return to_float(builder, builder.trunc(args[0], I16) if args[0].type != I16 else args[0])

        return sig, codegen

    return intrinsic(widen)


# bf16 is float32's top half: a 16-bit shift widens it exactly (LLVM vectorizes it to vpmovzxwd + vpslld)
bf16_to_f32 = _widen(lambda b, h: b.bitcast(b.shl(b.zext(h, I32), ir.Constant(I32, 16)), ir.FloatType()))
def _half_to_float(b: ir.IRBuilder, h):
    """IEEE half -> float32. With F16C, fpext (LLVM emits vcvtph2ps); without it LLVM would call compiler-rt's
    __extendhfsf2, which numba's JIT does not link, so there the bits are moved by hand: the 15 magnitude bits
    shifted into float32's exponent/mantissa and scaled by 2^112 (exact for normal and subnormal halves; infinities
    and NaNs, which no weight holds, come out finite), then the sign."""
    if _has_f16c():
        return b.fpext(b.bitcast(h, ir.HalfType()), ir.FloatType())
    wide = b.zext(h, I32)
    magnitude = b.bitcast(b.shl(b.and_(wide, ir.Constant(I32, 0x7FFF)), ir.Constant(I32, 13)), ir.FloatType())
    value = b.fmul(magnitude, ir.Constant(ir.FloatType(), 2.0**112))
    sign = b.shl(b.and_(wide, ir.Constant(I32, 0x8000)), ir.Constant(I32, 16))
    return b.bitcast(b.or_(b.bitcast(value, I32), sign), ir.FloatType())


def _has_f16c() -> bool:
    """Whether numba compiles for a CPU with F16C."""
    return "+f16c" in target_features().split(",")


f16_to_f32 = _widen(_half_to_float)


@intrinsic
def e8m0_half(typingctx, e):
    """An MXFP4 block's E8M0 exponent byte e -> 2^(e - 128) as float32: half its scale 2^(e - 127), as ggml's
    ggml_e8m0_to_fp32_half (the block's values are kept doubled); e < 2 gives the subnormals, 255 a finite 2^127."""
    sig = types.float32(e)

    def codegen(ctx, builder, sig, args):
        x = builder.zext(args[0], I32) if args[0].type.width < 32 else builder.trunc(args[0], I32)
        return e8m0_half_bits(builder, x, ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_bf16(typingctx, value):
    """float32 -> bf16 bits (uint16), rounded to nearest even as torch rounds; NaN stays a (quiet) NaN."""
    sig = types.uint16(types.float32)

    def codegen(ctx, builder, sig, args):
        bits = builder.bitcast(args[0], I32)
        odd = builder.and_(builder.lshr(bits, ir.Constant(I32, 16)), ir.Constant(I32, 1))
        rounded = builder.lshr(builder.add(bits, builder.add(odd, ir.Constant(I32, 0x7FFF))), ir.Constant(I32, 16))
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(nan, ir.Constant(I32, 0x7FC0), rounded), I16)

    return sig, codegen


# -- atomics and spinning for the thread pool ----------------------------------------------------------------


@intrinsic
def load_acquire(typingctx, arr, index):
    """arr[index] read with acquire ordering (int64 array): a spinning reader sees the writer's stores."""
    sig = types.int64(arr, index)

    def codegen(ctx, builder, sig, args):
        return builder.load_atomic(_pointer(ctx, builder, sig.args[0], *args), "acquire", 8)

    return sig, codegen


@intrinsic
def store_release(typingctx, arr, index, value):
    """arr[index] = value with release ordering (int64 array): everything written before is visible first."""
    sig = types.void(arr, index, value)

    def codegen(ctx, builder, sig, args):
        value = ctx.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(value, _pointer(ctx, builder, sig.args[0], args[0], args[1]), "release", 8)
        return ctx.get_dummy_value()

    return sig, codegen


@intrinsic
def fetch_add(typingctx, arr, index, value):
    """Atomically arr[index] += value (int64 array); returns the old value."""
    sig = types.int64(arr, index, value)

    def codegen(ctx, builder, sig, args):
        value = ctx.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", _pointer(ctx, builder, sig.args[0], args[0], args[1]), value, "acq_rel")

    return sig, codegen


@intrinsic
def cpu_relax(typingctx):
    """A spin-wait hint (x86 ``pause``; a plain no-op elsewhere): the sibling hyperthread and power thank us."""
    sig = types.void()

    def codegen(ctx, builder, sig, args):
        triple = builder.module.triple or ""
        if triple.startswith(("x86", "i686")):
            builder.call(_declare(builder, "llvm.x86.sse2.pause", ir.VoidType(), []), [])
        return ctx.get_dummy_value()

    return sig, codegen


def _pointer_to(dtype):
    def to_pointer(typingctx, address):
        sig = types.CPointer(dtype)(types.int64)

        def codegen(ctx, builder, sig, args):
            return builder.inttoptr(args[0], ctx.get_value_type(sig.return_type))

        return sig, codegen

    return intrinsic(to_pointer)


# An address (an int64 in a job descriptor) as a typed pointer, for numba.carray: how a worker that never returns to
# Python (pool.py) reaches the arrays of the job it is handed.
POINTERS = {name: _pointer_to(getattr(types, name))
            for name in ("uint8", "int8", "int16", "uint16", "float32", "int64")}
ptr_uint8, ptr_int8, ptr_int16, ptr_uint16, ptr_float32, ptr_int64 = POINTERS.values()
