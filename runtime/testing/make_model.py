"""Generate StarCoder2 / StarCoder GGUF files with random weights, laid out as llama.cpp expects.

Quantized tensors are drawn directly as random blocks (no float quantization), streamed chunk by
chunk, so real-sized files (StarCoder2-3B Q8_0, 3.2 GB) take seconds. Same arguments and seed give
byte-identical files.

    python -m runtime.testing.make_model --arch starcoder2 --preset tiny --type q8_0 -o m.gguf
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from runtime.ggml_types import BLOCK_SIZE, FileType, GGMLType, ValueType, row_bytes
from runtime.gguf_writer import GGUFWriter
from runtime.testing.code_tokenizer import MIN_VOCAB, train_code_vocab

ARCHS = ("starcoder2", "starcoder")
TYPES: dict[str, GGMLType] = {
    "f32": GGMLType.F32,
    "f16": GGMLType.F16,
    "q8_0": GGMLType.Q8_0,
    "q4_0": GGMLType.Q4_0,
    "q6_k": GGMLType.Q6_K,
}
WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_0")
FILE_TYPES = {
    GGMLType.F32: FileType.ALL_F32,
    GGMLType.F16: FileType.MOSTLY_F16,
    GGMLType.Q8_0: FileType.MOSTLY_Q8_0,
    GGMLType.Q4_0: FileType.MOSTLY_Q4_0,
}
# tokenizer.ggml.fim_{key}_token_id -> id in the code vocabulary (StarCoder2's special tokens)
FIM_IDS = {"pre": 1, "mid": 2, "suf": 3, "pad": 4, "rep": 5, "sep": 6}
NORM_EPS = 1e-5
LOGIT_STD = 4.0  # so that greedy decoding is decisive
CHUNK_BYTES = 16 << 20
PROGRESS_MIN_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Dims:
    """Model hyper-parameters (every one overridable from the CLI)."""

    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    vocab: int
    n_ctx: int
    rope_theta: float = 10000.0


PRESETS: dict[str, Dims] = {
    "tiny": Dims(64, 256, 2, 4, 2, 1000, 512),
    "small": Dims(256, 1024, 4, 8, 2, 4099, 2048),
    "3b": Dims(3072, 12288, 30, 24, 2, 49152, 16384, 999999.4420358813),
    "7b": Dims(4608, 18432, 32, 36, 4, 49152, 16384, 1000000.0),
}
DIM_NAMES = tuple(f.name for f in dataclasses.fields(Dims))


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    type: GGMLType
    std: float
    mean: float = 0.0
    random_sign: bool = False


# --- random data -------------------------------------------------------------------------------

# Every block scale is base * m with m uniform in [0.5, 1.5) drawn from one random byte, so that
# tests notice a runtime that mixes up block scales. The *_RMS constants make element std = target.
_M_RMS = float(np.sqrt(np.mean((0.5 + (np.arange(256) + 0.5) / 256) ** 2)))
_I8 = np.maximum(np.arange(256, dtype=np.uint8).view(np.int8), -127)  # random byte -> int8
_I8_RMS = float(np.sqrt(np.mean(_I8.astype(np.float64) ** 2)))
_Q4_RMS = float(np.sqrt(np.mean((np.arange(16) - 8.0) ** 2)))
_Q6_RMS = float(np.sqrt(np.mean((np.arange(64) - 32.0) ** 2)))


def _random_bytes(rng: np.random.Generator, n_blocks: int, block_bytes: int) -> np.ndarray:
    n = n_blocks * block_bytes
    raw = rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]
    return raw.reshape(n_blocks, block_bytes)


def _scales(raw: np.ndarray, col: int, base: float, signed: bool) -> np.ndarray:
    m = 0.5 + (raw[:, col].astype(np.float32) + 0.5) / 256
    if signed:  # real Q4_0 scales take the sign of the largest element
        m = np.where(raw[:, col + 1] & 1, -m, m)
    return (m * base).astype("<f2").view(np.uint8).reshape(-1, 2)


def _blocks(rng: np.random.Generator, t: GGMLType, n_blocks: int, std: float) -> np.ndarray:
    """`n_blocks` random blocks of quantized type `t` whose elements have std about `std`."""
    size = BLOCK_SIZE[t][1]
    raw = _random_bytes(rng, n_blocks, size)
    if t == GGMLType.Q8_0:  # fp16 d, int8 qs[32] in [-127, 127]
        d = _scales(raw, 0, std / (_I8_RMS * _M_RMS), signed=False)
        np.maximum(raw.view(np.int8), -127, out=raw.view(np.int8))
        raw[:, 0:2] = d
    elif t == GGMLType.Q4_0:  # fp16 d, 16 bytes of nibbles
        raw[:, 0:2] = _scales(raw, 0, std / (_Q4_RMS * _M_RMS), signed=True)
    elif t == GGMLType.Q6_K:  # ql[128], qh[64], int8 scales[16], fp16 d
        d = _scales(raw, 208, std / (_Q6_RMS * _I8_RMS * _M_RMS), signed=False)
        sc = raw[:, 192:208].view(np.int8)
        np.maximum(sc, -127, out=sc)
        raw[:, 208:210] = d
    else:
        raise ValueError(f"cannot generate {t.name} blocks")
    return raw


def _chunks(spec: _Tensor, seed: int) -> Iterator[np.ndarray]:
    """The tensor's bytes, in chunks of about CHUNK_BYTES (whole rows)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(spec.name.encode())])))
    cols = spec.shape[-1]
    rows = math.prod(spec.shape[:-1])
    per = max(1, CHUNK_BYTES // row_bytes(spec.type, cols))
    for r0 in range(0, rows, per):
        n = min(per, rows - r0) * cols
        if spec.type in (GGMLType.F32, GGMLType.F16):
            x = rng.standard_normal(n, dtype=np.float32)
            x *= spec.std
            x += spec.mean
            if spec.random_sign:
                x *= rng.choice(np.array([-1, 1], np.float32), n)
            yield x.astype("<f4" if spec.type == GGMLType.F32 else "<f2", copy=False)
        else:
            yield _blocks(rng, spec.type, n // BLOCK_SIZE[spec.type][0], spec.std)


# --- model layout ------------------------------------------------------------------------------


def _tensors(arch: str, d: Dims, wt: GGMLType, head_t: GGMLType, untied: bool) -> list[_Tensor]:
    E, F = d.n_embd, d.n_ff
    hd = E // d.n_head
    # Tied head: logits = output_norm(h) . embd. Scale the norm so logits have std LOGIT_STD, and
    # give its weights random signs, else h's own embedding dominates and every token predicts itself.
    norm_s = 1.0 if untied else LOGIT_STD / math.sqrt(E)

    def norm(name: str, scale: float = 1.0, sign: bool = False) -> list[_Tensor]:
        return [
            _Tensor(f"{name}.weight", (E,), GGMLType.F32, 0.1 * scale, scale, sign),
            _Tensor(f"{name}.bias", (E,), GGMLType.F32, 0.05 * scale),
        ]

    def linear(name: str, n_out: int, n_in: int) -> list[_Tensor]:
        return [
            _Tensor(f"{name}.weight", (n_out, n_in), wt, 1 / math.sqrt(n_in)),
            _Tensor(f"{name}.bias", (n_out,), GGMLType.F32, 0.05),
        ]

    out = [_Tensor("token_embd.weight", (d.vocab, E), wt if untied else head_t, 1.0)]
    if arch == "starcoder":
        out.append(_Tensor("position_embd.weight", (d.n_ctx, E), GGMLType.F32, 0.1))
    for i in range(d.n_layer):
        b = f"blk.{i}"
        out += norm(f"{b}.attn_norm")
        if arch == "starcoder":
            out += linear(f"{b}.attn_qkv", E + 2 * hd, E)
        else:
            out += linear(f"{b}.attn_q", E, E)
            out += linear(f"{b}.attn_k", d.n_head_kv * hd, E)
            out += linear(f"{b}.attn_v", d.n_head_kv * hd, E)
        out += linear(f"{b}.attn_output", E, E)
        out += norm(f"{b}.ffn_norm")
        out += linear(f"{b}.ffn_up", F, E)
        out += linear(f"{b}.ffn_down", E, F)
    out += norm("output_norm", norm_s, sign=not untied)
    if untied:
        out.append(_Tensor("output.weight", (d.vocab, E), head_t, LOGIT_STD / math.sqrt(E)))
    return out


def _dims(arch: str, preset: str, overrides: dict[str, Any]) -> Dims:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    unknown = set(overrides) - set(DIM_NAMES)
    if unknown:
        raise ValueError(f"unknown override(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if arch == "starcoder":
        if given.get("n_head_kv", 1) != 1:
            raise ValueError("starcoder (multi-query attention) needs --n-head-kv 1")
        given["n_head_kv"] = 1
    d = dataclasses.replace(PRESETS[preset], **given)
    for k in DIM_NAMES[:-1]:
        v = getattr(d, k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be a positive integer, got {v!r}")
    if not (isinstance(d.rope_theta, int | float) and d.rope_theta > 0):
        raise ValueError(f"--rope-theta must be positive, got {d.rope_theta!r}")
    if d.vocab < MIN_VOCAB:
        raise ValueError(f"--vocab must be at least {MIN_VOCAB}, got {d.vocab}")
    if d.n_embd % d.n_head:
        raise ValueError(f"--n-embd {d.n_embd} is not a multiple of --n-head {d.n_head}")
    if (d.n_embd // d.n_head) % 2:
        raise ValueError(f"head size {d.n_embd // d.n_head} must be even")
    if d.n_head % d.n_head_kv:
        raise ValueError(f"--n-head {d.n_head} is not a multiple of --n-head-kv {d.n_head_kv}")
    return d


def _check_rows(d: Dims, wt: GGMLType, head_t: GGMLType) -> None:
    rows = (
        ("--n-embd", d.n_embd, wt, "weight"),
        ("--n-ff", d.n_ff, wt, "weight"),
        ("--n-embd", d.n_embd, head_t, "head"),
    )
    for flag, n, t, what in rows:
        block = BLOCK_SIZE[t][0]
        if n % block:
            raise ValueError(f"{flag} {n} is not a multiple of {block}, required by {what} type {t.name.lower()}")


def make_model(
    path: str | os.PathLike[str],
    *,
    arch: str = "starcoder2",
    preset: str = "tiny",
    wtype: str = "f32",
    head_type: str | None = None,
    untied: bool = False,
    seed: int = 0,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random-weight GGUF model to `path` and return it.

    `wtype` is the type of every 2-D weight (f32, f16, q8_0, q4_0); `head_type` overrides the LM
    head's (output.weight if `untied`, else token_embd.weight), e.g. q6_k as llama-quantize does.
    `overrides` are Dims fields (n_embd, n_ff, n_layer, n_head, n_head_kv, vocab, n_ctx,
    rope_theta). ValueError for bad arguments.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    if wtype not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {wtype!r} (choose from {', '.join(WEIGHT_TYPES)})")
    if head_type is not None and head_type not in TYPES:
        raise ValueError(f"unknown head type {head_type!r} (choose from {', '.join(TYPES)})")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    d = _dims(arch, preset, overrides)
    wt = TYPES[wtype]
    head_t = TYPES[head_type or wtype]
    _check_rows(d, wt, head_t)
    vocab = train_code_vocab(d.vocab)

    w = GGUFWriter(path)
    a = arch  # key prefix
    w.add_kv("general.architecture", arch)
    w.add_kv("general.name", f"llmctl-test-{arch}-{preset}")
    w.add_kv("general.file_type", int(FILE_TYPES[wt]))
    w.add_kv("general.quantization_version", 2)
    w.add_kv(f"{a}.context_length", d.n_ctx)
    w.add_kv(f"{a}.embedding_length", d.n_embd)
    w.add_kv(f"{a}.block_count", d.n_layer)
    w.add_kv(f"{a}.feed_forward_length", d.n_ff)
    w.add_kv(f"{a}.attention.head_count", d.n_head)
    w.add_kv(f"{a}.attention.head_count_kv", d.n_head_kv)
    w.add_kv(f"{a}.attention.layer_norm_epsilon", NORM_EPS)
    if arch == "starcoder2":
        w.add_kv(f"{a}.rope.freq_base", float(d.rope_theta))
    w.add_kv("tokenizer.ggml.model", "gpt2")
    w.add_kv("tokenizer.ggml.pre", "starcoder")
    w.add_kv("tokenizer.ggml.tokens", vocab.tokens, ValueType.STRING)
    w.add_kv("tokenizer.ggml.token_type", vocab.token_types, ValueType.INT32)
    w.add_kv("tokenizer.ggml.merges", vocab.merges, ValueType.STRING)
    w.add_kv("tokenizer.ggml.bos_token_id", 0)
    w.add_kv("tokenizer.ggml.eos_token_id", 0)
    w.add_kv("tokenizer.ggml.add_bos_token", False)
    for key, tid in FIM_IDS.items():
        w.add_kv(f"tokenizer.ggml.fim_{key}_token_id", tid)

    specs = _tensors(arch, d, wt, head_t, untied)
    total = 0
    for s in specs:
        w.add_tensor_info(s.name, s.shape, s.type)
        total += row_bytes(s.type, s.shape[-1]) * math.prod(s.shape[:-1])
    report = _progress(path, total) if progress and total >= PROGRESS_MIN_BYTES else None

    def data() -> Iterator[tuple[str, Iterator[np.ndarray]]]:
        for i, s in enumerate(specs):
            chunks = _chunks(s, seed)
            if report:
                chunks = _counted(chunks, report, f"[{i + 1}/{len(specs)}] {s.name}")
            yield s.name, chunks

    return w.write(data())


def _progress(path: str | os.PathLike[str], total: int) -> Callable[[int, str], None]:
    start = last = time.monotonic()
    done = 0

    def report(n: int, what: str) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= 2 or done == total:
            last = now
            print(
                f"{path}: {done / 1e9:.2f}/{total / 1e9:.2f} GB {what} ({now - start:.0f} s)",
                file=sys.stderr,
            )

    return report


def _counted(chunks: Iterator[np.ndarray], report: Callable[[int, str], None], what: str) -> Iterator[np.ndarray]:
    for c in chunks:
        yield c
        report(c.nbytes, what)


# --- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; bad arguments give a one-line argparse error and exit code 2."""
    p = argparse.ArgumentParser(prog="python -m runtime.testing.make_model", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=ARCHS, default="starcoder2")
    p.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    p.add_argument(
        "--type",
        dest="wtype",
        choices=WEIGHT_TYPES,
        default="f32",
        help="type of 2-D weights",
    )
    p.add_argument(
        "--head-type",
        choices=tuple(TYPES),
        help="LM head type (default: --type), e.g. q6_k",
    )
    p.add_argument("--untied", action="store_true", help="add a separate output.weight")
    p.add_argument("-o", "--output", help="output file (default: ARCH-PRESET-TYPE.gguf)")
    p.add_argument("--seed", type=int, default=0)
    for name in DIM_NAMES:
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=float if name == "rope_theta" else int,
            metavar="X" if name == "rope_theta" else "N",
            help=f"override the preset's {name}",
        )
    args = p.parse_args(argv)
    overrides = {k: getattr(args, k) for k in DIM_NAMES}
    out = Path(args.output or f"{args.arch}-{args.preset}-{args.wtype}.gguf")
    start = time.monotonic()
    try:
        make_model(
            out,
            arch=args.arch,
            preset=args.preset,
            wtype=args.wtype,
            head_type=args.head_type,
            untied=args.untied,
            seed=args.seed,
            progress=True,
            **overrides,
        )
    except ValueError as e:
        p.error(str(e))
    except OSError as e:
        p.error(f"cannot write {out}: {e.strerror or e}")
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - start:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
