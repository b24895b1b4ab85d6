"""NumPy reference implementations of the GGML block formats the runtime reads.

Each format is a small class with block-level dequantize (and, for activation formats, quantize),
registered by ggml type id. They are the readable specification the C kernels are tested
against, and they serve the rare non-hot paths (inspection, tests); the forward pass never
dequantizes a weight matrix.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from runtime.ggml_types import BLOCK_SIZE, GGMLType

_FORMATS: dict[GGMLType, type[QuantFormat]] = {}


class QuantFormat:
    ggml_type: ClassVar[GGMLType]

    def __init_subclass__(cls) -> None:
        _FORMATS[cls.ggml_type] = cls

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """uint8 [n_blocks, block_bytes] -> float32 [n_blocks, block_elements]."""
        raise NotImplementedError


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


class F32(QuantFormat):
    ggml_type = GGMLType.F32

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view("<f4").reshape(-1, 1)


class F16(QuantFormat):
    ggml_type = GGMLType.F16

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _f16(blocks).reshape(-1, 1)


class Q8_0(QuantFormat):
    """fp16 d; int8 qs[32]; x = qs * d."""

    ggml_type = GGMLType.Q8_0

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _f16(blocks[:, :2])
        return blocks[:, 2:].view(np.int8).astype(np.float32) * d

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        """Activation quantization as ggml's AVX2 quantize_row_q8_0: id = 127/amax, round half even."""
        xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)
        amax = np.abs(xb).max(axis=1, keepdims=True)
        d = (amax / np.float32(127)).astype(np.float16)
        with np.errstate(divide="ignore"):
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.rint(xb * inv).astype(np.int8)  # np.rint rounds half to even
        out = np.empty((xb.shape[0], 34), dtype=np.uint8)
        out[:, :2] = d.view(np.uint8)
        out[:, 2:] = q.view(np.uint8)
        return out.reshape(-1)


class Q4_0(QuantFormat):
    """fp16 d; uint8 qs[16]; element j = (low nibble - 8) * d, element j+16 = (high nibble - 8) * d."""

    ggml_type = GGMLType.Q4_0

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _f16(blocks[:, :2])
        qs = blocks[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
        return q.astype(np.float32) * d


class Q6_K(QuantFormat):
    """Super-block of 256: ql[128], qh[64], int8 scales[16], fp16 d; 6-bit values minus 32."""

    ggml_type = GGMLType.Q6_K

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        ql = blocks[:, :128].reshape(n, 2, 64).astype(np.int16)
        qh = blocks[:, 128:192].reshape(n, 2, 32).astype(np.int16)
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 8)
        d = _f16(blocks[:, 208:210]).reshape(n, 1, 1)
        q = np.empty((n, 2, 4, 32), dtype=np.int16)
        q[:, :, 0] = (ql[:, :, :32] & 15) | ((qh & 3) << 4)
        q[:, :, 1] = (ql[:, :, 32:] & 15) | (((qh >> 2) & 3) << 4)
        q[:, :, 2] = (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4)
        q[:, :, 3] = (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4)
        # scale index for element l of quarter k in a half: 2k + l // 16
        scales = sc.reshape(n, 2, 4, 2, 1)
        vals = (q.reshape(n, 2, 4, 2, 16) - 32).astype(np.float32) * scales * d.reshape(n, 1, 1, 1, 1)
        return vals.reshape(n, 256)


class Q8_K(QuantFormat):
    """float d; int8 qs[256]; int16 bsums[16] (activations for K-quant weights)."""

    ggml_type = GGMLType.Q8_K

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = np.ascontiguousarray(blocks[:, :4]).view("<f4")
        return blocks[:, 4:260].view(np.int8).astype(np.float32) * d

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        """ggml's quantize_row_q8_K_ref: iscale = -127/max (max = signed value of largest |x|)."""
        xb = np.asarray(x, dtype=np.float32).reshape(-1, 256)
        idx = np.abs(xb).argmax(axis=1)
        mx = xb[np.arange(xb.shape[0]), idx][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
            q = np.minimum(np.rint(iscale * xb), 127).astype(np.int8)
            d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
        out = np.zeros((xb.shape[0], 292), dtype=np.uint8)
        out[:, :4] = d.astype("<f4").view(np.uint8)
        out[:, 4:260] = q.view(np.uint8)
        out[:, 260:] = q.reshape(-1, 16, 16).astype(np.int16).sum(axis=2).astype("<i2").view(np.uint8)
        return out.reshape(-1)


def dequantize(raw: np.ndarray, ggml_type: GGMLType | int, n_cols: int) -> np.ndarray:
    """Raw bytes (uint8, whole rows) of `ggml_type` -> float32 [rows, n_cols]."""
    t = GGMLType(ggml_type)
    fmt = _FORMATS.get(t)
    if fmt is None:
        raise NotImplementedError(f"no reference dequantizer for {t.name}")
    elems, size = BLOCK_SIZE[t]
    blocks = np.ascontiguousarray(raw).reshape(-1, size)
    return fmt.dequantize_blocks(blocks).reshape(-1, n_cols)


# --- weight quantization (ggml's quantize_row_*_ref, bit for bit) -------------------------------
#
# llama-quantize turns float rows into blocks with these reference routines (ggml-quants.c, built
# without FMA in ggml-base). They are reproduced in float32 with the C code's order of operations,
# so the bytes are identical. They differ from the activation quantizers above (Q8_0.quantize is
# the AVX2 activation path, which rounds half to even).


def _round_away(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) of a float32 array, exactly."""
    t = np.trunc(x)
    return np.where(np.abs(x - t) >= np.float32(0.5), t + np.sign(x), t)


def _x86_int8(v: np.ndarray) -> np.ndarray:
    """(int8_t) of integral float32 values as x86 code does it: cvttss2si to int32 (0x80000000 for
    NaN, infinities and anything out of range), then the low byte."""
    if np.all(np.abs(v) <= 127):  # NaN compares false
        return v.astype(np.int8)
    ok = np.isfinite(v) & (np.abs(v) < np.float32(2.0**31))
    i32 = np.where(ok, v, np.float32(0)).astype(np.int64)
    i32 = np.where(ok, i32, -(2**31))
    return (((i32 + 128) & 0xFF) - 128).astype(np.int8)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 [n*32] -> Q8_0 bytes (uint8 [n*34]), as ggml's quantize_row_q8_0_ref.

    d = amax / 127, id = 1/d (0 when d == 0), q = roundf(x * id)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        q = _x86_int8(_round_away(xb * inv))
    out = np.empty((xb.shape[0], 34), dtype=np.uint8)
    with np.errstate(over="ignore"):  # |d| > 65504 becomes inf, as in ggml
        out[:, :2] = d.astype("<f2").view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(-1)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """float32 [n*32] -> Q4_0 bytes (uint8 [n*18]), as ggml's quantize_row_q4_0_ref.

    Per block: max = the element of largest magnitude (first one on ties), with its sign;
    d = max / -8; id = 1/d (0 when d == 0); q = min(15, (int8_t)(x*id + 8.5f)); d stored as fp16;
    byte j holds element j in its low nibble and element j+16 in its high nibble."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    n = xb.shape[0]
    imax = np.abs(xb).argmax(axis=1)
    mx = xb[np.arange(n), imax][:, None]
    d = mx / np.float32(-8)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.trunc(xb * inv + np.float32(8.5))
    if np.all(v >= 0) and np.all(v <= 16):  # always, unless id overflowed (|max| < ~2e-37)
        q = np.minimum(v.astype(np.uint8), 15)
    else:  # inf/NaN: MIN(15, (int8_t)v) with x86's conversion, then the store into a uint8_t nibble
        q = (np.minimum(_x86_int8(v).astype(np.int16), 15) & 0xFF).astype(np.uint8)
    out = np.empty((n, 18), dtype=np.uint8)
    with np.errstate(over="ignore"):  # |d| > 65504 becomes inf, as in ggml
        out[:, :2] = d.astype("<f2").view(np.uint8)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(-1)


_GROUP_MAX_EPS = np.float32(1e-15)


def _sequential_sum(terms: np.ndarray) -> np.ndarray:
    """Column sums of a float32 [k, n] array, added top to bottom in float32 as a C loop does."""
    s = terms[0].copy()
    for row in terms[1:]:
        s += row
    return s


def _make_qx_quants_32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(16, nmax=32, x, L, rmse_type=1, qw=NULL), one sub-block per column.

    x is float32 [16, n] (element, sub-block); returns float32 scales [n] and uint8 L [16, n]
    (values 0..63). Sums run in float32 in the C loop's order; nearest_int rounds half to even.
    The C code recomputes L whenever a trial scale wins; keeping the winning iscale and rounding
    once at the end gives the same L."""
    nmax = np.float32(32)
    cols = np.arange(x.shape[1])
    mx = x[np.abs(x).argmax(axis=0), cols]
    zero = np.abs(mx) < _GROUP_MAX_EPS
    mx = np.where(zero, np.float32(1), mx)  # avoids inf/NaN; those sub-blocks are reset below
    w = x * x
    wx = w * x
    lf = np.empty_like(x)
    tmp = np.empty_like(x)

    def levels(iscale: np.ndarray) -> np.ndarray:
        np.multiply(iscale, x, out=lf)
        np.rint(lf, out=lf)
        return np.clip(lf, -nmax, nmax - 1, out=lf)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        levels(iscale)
        sumlx = _sequential_sum(np.multiply(wx, lf, out=tmp))  # (w*x)*l
        np.multiply(w, lf, out=tmp)
        np.multiply(tmp, lf, out=tmp)  # (w*l)*l
        return sumlx, _sequential_sum(tmp)

    best_iscale = -nmax / mx
    sumlx, suml2 = sums(best_iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0)).astype(np.float32)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = -(nmax + np.float32(0.1) * np.float32(step)) / mx
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                scale_c = sumlx / suml2
            scale = np.where(better, scale_c, scale)
            best = np.where(better, scale_c * sumlx, best)
            best_iscale = np.where(better, iscale, best_iscale)
    L = (levels(best_iscale) + nmax).astype(np.uint8)
    L[:, zero] = 0
    scale[zero] = 0
    return scale, L


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [n*256] -> Q6_K bytes (uint8 [n*210]), as ggml's quantize_row_q6_K_ref.

    Each 16-element sub-block gets a scale from make_qx_quants (weighted by x^2, 18 trial scales);
    the 16 scales are quantized to int8 against the super-block's largest one (d = fp16(max/-128)),
    and the elements are requantized to 6 bits against the rounded scales."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 256)
    n = xb.shape[0]
    scales, L_t = _make_qx_quants_32(np.ascontiguousarray(xb.reshape(-1, 16).T))
    scales = scales.reshape(n, 16)
    L = np.ascontiguousarray(L_t.T).reshape(n, 16, 16)
    rows = np.arange(n)
    max_scale = scales[rows, np.abs(scales).argmax(axis=1)]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    max_scale = np.where(zero, np.float32(1), max_scale)
    iscale = (np.float32(-128) / max_scale)[:, None]
    with np.errstate(over="ignore"):
        d16 = (np.float32(1) / iscale).astype("<f2")
    sc = np.minimum(np.rint(iscale * scales), 127).astype(np.int8)
    d = d16.astype(np.float32) * sc.astype(np.float32)  # [n, 16]
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):  # sub-blocks with d == 0 keep their L
        lf = np.clip(np.rint(xb.reshape(n, 16, 16) / np.where(nz, d, np.float32(1))[:, :, None]), -32, 31)
    q = np.where(nz[:, :, None], (lf + 32).astype(np.uint8), L).reshape(n, 2, 4, 32)
    # per 128-element half: ql[l] = L[l] | L[l+64] << 4, ql[l+32] = L[l+32] | L[l+96] << 4,
    # qh[l] = the top two bits of L[l], L[l+32], L[l+64], L[l+96] at bits 0, 2, 4, 6
    out = np.empty((n, 210), dtype=np.uint8)
    ql = out[:, :128].reshape(n, 2, 2, 32)
    ql[:, :, 0] = (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)
    out[:, 128:192].reshape(n, 2, 32)[:] = (
        (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    )
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8).reshape(n, 2)
    out[zero] = 0
    return out.reshape(-1)
