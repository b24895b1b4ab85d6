"""GGML tensor types, GGUF value types and block sizes shared by the GGUF reader and writer."""

from __future__ import annotations

from enum import IntEnum


class GGMLType(IntEnum):
    """ggml tensor type ids as stored in GGUF tensor infos."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q8_0 = 8
    Q4_K = 12
    Q6_K = 14
    Q8_K = 15
    BF16 = 30


# (elements per block, bytes per block)
BLOCK_SIZE: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
    GGMLType.BF16: (1, 2),
}


def row_bytes(t: GGMLType | int, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements of type `t`; ValueError if not a whole number of blocks."""
    t = GGMLType(t)
    block, size = BLOCK_SIZE[t]
    if n_cols % block:
        raise ValueError(f"{t.name} rows need a multiple of {block} elements, got {n_cols}")
    return n_cols // block * size


# ggml types that exist but that the runtime does not read: named in error messages.
OTHER_GGML_TYPES: dict[int, str] = {
    3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 13: "Q5_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip


class ValueType(IntEnum):
    """GGUF metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct formats of the scalar GGUF value types (shared by the reader and the writer)
SCALAR_FORMATS: dict[ValueType, str] = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}


class FileType(IntEnum):
    """`general.file_type` values (llama_ftype) used by the project."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q8_0 = 7
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q6_K = 18
