"""Fill the SBOM's model description from a GGUF file (the only place the SBOM code touches `runtime`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from registry.sbom import ModelInfo, WeightFile
from runtime.config import ModelConfig
from runtime.ggml_types import FileType
from runtime.gguf import read_gguf


def quantization_name(file_type: object) -> str:
    """general.file_type as the name users know (Q4_0, Q8_0, F16, ...)."""
    if isinstance(file_type, int) and file_type in FileType._value2member_map_:
        return FileType(file_type).name.split("_", 1)[1]
    return f"file_type={file_type}"


def model_info_from_gguf(
    path: Path, *, name: str, version: str, datasets: tuple[str, ...] = ("bigcode/the-stack-v2",)
) -> ModelInfo:
    """Architecture, context length and quantization from the GGUF header; the rest from the chart."""
    with read_gguf(path) as f:
        cfg = ModelConfig.from_gguf(f)
        quant = quantization_name(f.get("general.file_type"))
    return ModelInfo(
        name=name,
        version=version,
        architecture=cfg.arch,
        context_length=cfg.n_ctx_train,
        quantization=quant,
        datasets=datasets,
    )


def weight_file(local: Path, *, image_path: str) -> WeightFile:
    """Hash a local weight file that will live at `image_path` in the image."""
    h = hashlib.sha256()
    with open(local, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return WeightFile(path=image_path, sha256=h.hexdigest(), size=local.stat().st_size)
