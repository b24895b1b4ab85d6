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
