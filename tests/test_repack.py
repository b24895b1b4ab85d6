"""Q4_0 and Q8_0 matrices repacked for the SIMD sets' tiles (runtime/repack.py, REPACKED_Q4_0 and
REPACKED_Q8_0 in kernels.c): the layouts, the same bits as the file's layout on every kernel set,
and the model's background repacking: forward passes during it, the file's pages it gives back,
closing and failing."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runtime.repack as repack_module
from runtime import Model
from runtime.ggml_types import GGMLType
from runtime.gguf import GGUFFile
from runtime.kernels import _kernels
from runtime.model import MATRICES
from runtime.testing.make_model import make_model
from tests.polling import until
from tests.test_kernels import _activations, _random_q_rows

Q4_0 = int(GGMLType.Q4_0)
Q8_0 = int(GGMLType.Q8_0)


def _layout(rows: np.ndarray, wtype: GGMLType = GGMLType.Q4_0) -> np.ndarray:
    """The repacked layout as REPACKED_Q4_0 and REPACKED_Q8_0 describe it: per group of 16 (Q4_0)
    or 8 (Q8_0) rows and block, the rows' fp16 scales, then four units of each row's 32-bit words
    u, 4 + u, ... side by side: Q4_0 quant bytes 4u .. 4u+3 (row r at 4r), Q8_0 lanes u and 4 + u
    (bytes 4u .. 4u+3 and 16+4u .. 16+4u+3, row r at 8r)."""
    n, row_bytes = rows.shape
    group, block_bytes = (16, 18) if wtype == GGMLType.Q4_0 else (8, 34)
    words = (block_bytes - 2) // 16  # of a row's words per unit
    ng, nb = n // group, row_bytes // block_bytes
    blocks = rows.reshape(ng, group, nb, block_bytes)  # group, row, block, bytes
    scales = blocks[..., :2].transpose(0, 2, 1, 3).reshape(ng, nb, 2 * group)
    quants = blocks[..., 2:].reshape(ng, group, nb, words, 4, 4)  # group, row, block, word / 4, unit, byte
    units = quants.transpose(0, 2, 4, 1, 3, 5).reshape(ng, nb, 256)
    return np.concatenate([scales, units], axis=2).reshape(n, row_bytes)


def _repacked(rows: np.ndarray, k: int, threads: int = 2, wtype: GGMLType = GGMLType.Q4_0) -> np.ndarray:
    out = np.empty_like(rows)
    repack_module.LAYOUTS[wtype].repack(rows, k, out, threads)
    return out


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (464, 2240)])
def test_repack_writes_the_documented_layout(n: int, k: int) -> None:
    rows = _random_q_rows(np.random.default_rng(n), GGMLType.Q4_0, n, k)
    for threads in (1, 3):
        assert np.array_equal(_repacked(rows, k, threads), _layout(rows))
    q8_rows = _random_q_rows(np.random.default_rng(n), GGMLType.Q8_0, n, k)
    for threads in (1, 3):
        assert np.array_equal(_repacked(q8_rows, k, threads, GGMLType.Q8_0), _layout(q8_rows, GGMLType.Q8_0))


# (weight rows, row length): one group and many, rows as long as a down projection's, and enough
# groups for several chunks per thread
REPACK_SHAPES = [(16, 32), (32, 96), (48, 256), (64, 160), (112, 1024), (64, 4160), (464, 2240)]


# (weight rows, row length) for Q8_0: one group of 8 and many, an odd number of groups (a tile's
# groups and the single ones left over), long rows, and several chunks per thread
Q8_REPACK_SHAPES = [(8, 32), (24, 96), (40, 256), (56, 160), (104, 1024), (48, 4160), (456, 2240)]


@pytest.mark.parametrize("wtype", [GGMLType.Q4_0, GGMLType.Q8_0])
def test_repacked_matmul_gives_the_file_layouts_bits(kernel_set: str, wtype: GGMLType) -> None:
    """Every tile shape of the SIMD sets (Q4_0: 1 to 17 activation rows, groups side by side, zmm
    and ymm, with and without VNNI, zmm decode by four groups into L2 and by two into L1; Q8_0: 4
    or 3 rows by one group, or by two when they are all the rows and prefetching into L1, 2 by two,
    1 by four when prefetching into L2 and by two into L1)
    and the other sets' reading of the layout give the file layout's bits (Q4_0's block order,
    Q8_0's vec_dot order), on every thread count and prefetch level."""
    rng = np.random.default_rng(3)
    layout = repack_module.LAYOUTS[wtype]
    shapes, most_rows = (REPACK_SHAPES, 17) if wtype == GGMLType.Q4_0 else (Q8_REPACK_SHAPES, 10)
    try:
        for n, k in shapes:
            rows = _random_q_rows(rng, wtype, n, k)
            packed = _repacked(rows, k, wtype=wtype)
            for m in range(1, most_rows + 1):
                x = _activations(rng, m, k)
                ref = np.empty((m, n), dtype=np.float32)
                _kernels.matmul(int(wtype), rows, k, x, ref, 1)
                for level, threads in itertools.product(("l1", "l2"), (1, 2, 3)):
                    _kernels.prefetch(level)
                    out = np.empty((m, n), dtype=np.float32)
                    _kernels.matmul(layout.kernel_type, packed, k, x, out, threads)
                    where = (kernel_set, n, k, m, level, threads)
                    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), where
    finally:
        _kernels.prefetch("auto")


@pytest.mark.parametrize("wtype", [GGMLType.Q4_0, GGMLType.Q8_0])
def test_repacked_matmul_applies_the_epilogue(kernel_set: str, wtype: GGMLType) -> None:
    rng = np.random.default_rng(4)
    n, k, m = 64, 256, 3
    rows = _random_q_rows(rng, wtype, n, k)
    x = _activations(rng, m, k)
    bias = rng.standard_normal(n).astype(np.float32)
    add = rng.standard_normal((m, n)).astype(np.float32)
    ref = np.empty((m, n), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    _kernels.matmul(int(wtype), rows, k, x, ref, 2, bias, True, add)
    layout = repack_module.LAYOUTS[wtype]
    _kernels.matmul(layout.kernel_type, _repacked(rows, k, wtype=wtype), k, x, out, 2, bias, True, add)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("wtype", [GGMLType.Q4_0, GGMLType.Q8_0])
def test_repacking_refuses_rows_that_are_not_whole_groups(wtype: GGMLType) -> None:
    layout = repack_module.LAYOUTS[wtype]
    group = layout.group_rows
    n = group + group // 2
    rows = _random_q_rows(np.random.default_rng(5), wtype, n, 64)
    name = f"repack_{wtype.name.lower()}"
    with pytest.raises(ValueError, match=f"{name}: {n} rows are not a multiple of {group}"):
        layout.repack(rows, 64, np.empty_like(rows), 1)
    with pytest.raises(ValueError, match=f"{name} shapes"):
        layout.repack(rows[:group], 96, np.empty_like(rows[:group]), 1)
    out = np.empty((1, n), dtype=np.float32)
    with pytest.raises(ValueError, match="unsupported weight type"):
        _kernels.matmul(layout.kernel_type, rows, 64, np.ones((1, 64), np.float32), out)
    with pytest.raises(ValueError, match=f"rows of {rows.shape[1]} bytes for 96 elements"):  # would read past the rows
        _kernels.matmul(layout.kernel_type, rows[:group], 96, np.ones((1, 96), np.float32), out[:, :group])


@pytest.fixture(scope="module")
def q4_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("repack")
    models = {
        arch: make_model(d / f"{arch}.gguf", arch=arch, preset="small", wtype="q4_0", head_type="q6_k", seed=2)
        for arch in ("starcoder2", "starcoder")
    }
    # layers spanning several huge pages of the file beyond the embeddings'
    models["12 layers"] = make_model(d / "deep.gguf", preset="small", wtype="q4_0", head_type="q6_k", n_layer=12)
    return models


def _eval(path: Path, ids: list[int], repack: bool) -> np.ndarray:
    with Model.load(path, n_ctx=256, repack=repack) as model:
        assert model.wait_repacked(60)
        return model.eval(ids)


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("repack8") / "q8.gguf", preset="small", wtype="q8_0", seed=4)


@pytest.mark.parametrize("arch", ["starcoder2", "starcoder", "q8_0"])
def test_a_repacked_model_gives_the_same_logits(
    kernel_set: str, q4_models: dict[str, Path], q8_model: Path, arch: str
) -> None:
    """Prompt and decode rows alike (eval runs the prompt in one pass, complete decodes row by
    row), on every kernel set: the SIMD sets' tiles, or the other sets reading the layout."""
    ids = list(range(5, 105))
    path = q8_model if arch == "q8_0" else q4_models[arch]
    if not repack_module.LAYOUTS[GGMLType.Q8_0 if arch == "q8_0" else GGMLType.Q4_0].has_tile():
        pytest.skip(f"the {kernel_set} kernels have no tile for the layout: the matmul tests cover their reading of it")
    with Model.load(path, n_ctx=256, repack=True) as model:
        assert model.wait_repacked(60)
        assert model.transformer.repacking is not None and model.transformer.repacking.error is None
        assert all(block.wo.repacked and block.ffn_down.repacked for block in model.transformer.blocks)
        logits = model.eval(ids)
        tokens = model.complete(ids[:20], max_tokens=12, temperature=0).tokens
    with Model.load(path, n_ctx=256, repack=False) as plain:
        assert plain.transformer.repacking is None
        assert not any(block.wo.repacked for block in plain.transformer.blocks)
        assert np.array_equal(logits.view(np.uint32), plain.eval(ids).view(np.uint32))
        assert tokens == plain.complete(ids[:20], max_tokens=12, temperature=0).tokens


def test_repacking_only_where_the_set_has_a_tile(kernel_set: str, q4_models: dict[str, Path], q8_model: Path) -> None:
    assert _kernels.repacks_q4_0() == (kernel_set != "generic")
    assert _kernels.repacks_q8_0() == (kernel_set == "avx512vnni")
    for repack in (None, True):
        with Model.load(q4_models["starcoder2"], n_ctx=64, repack=repack) as model:
            assert (model.transformer.repacking is not None) == (kernel_set != "generic")
        with Model.load(q8_model, n_ctx=64, repack=repack) as model:
            assert (model.transformer.repacking is not None) == (kernel_set == "avx512vnni")
            assert model.wait_repacked(60)
            assert model.transformer.blocks[0].ffn_up.repacked == (kernel_set == "avx512vnni")
    with Model.load(q8_model, n_ctx=64, repack=False) as model:
        assert model.transformer.repacking is None


def _resident_pages(f: GGUFFile, name: str) -> np.ndarray:
    """Addresses of the whole pages of tensor `name` mapped into this process (/proc/self/pagemap's
    present bit); the pages it shares with its neighbours are left out."""
    base = f.raw(name).ctypes.data
    first, last = -(-base // 4096), (base + f.tensors[name].n_bytes) // 4096
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((last - first) * 8), dtype=np.uint64)
    return (first + np.flatnonzero(entries >> np.uint64(63))) * 4096


def _stray_pages(model: Model, names: list[str]) -> dict[str, int]:
    """Pages of the matrices `names` still mapped, except in the huge pages of the file that also
    hold the embeddings, which stay in use (reading them maps their whole huge page back)."""
    huge = repack_module.HUGE_PAGE
    embd = model.gguf.raw("token_embd.weight")
    shared = range(embd.ctypes.data // huge, (embd.ctypes.data + embd.size) // huge + 1)
    counts = {name: sum(p // huge not in shared for p in _resident_pages(model.gguf, name)) for name in names}
    return {name: n for name, n in counts.items() if n}


def test_repacked_matrices_leave_the_files_pages(q4_models: dict[str, Path]) -> None:
    """Once repacked, a matrix's pages of the mapped file are no longer in the process (RSS stays
    near the file's size), even after forward passes that read the vectors beside them."""
    with Model.load(q4_models["12 layers"], n_ctx=256, repack=True) as model:
        f = model.gguf
        names = [name for name, info in f.tensors.items() if repack_module.repackable(info)]
        assert len(names) == 72 and model.wait_repacked(60)
        model.eval(list(range(30)))
        assert _stray_pages(model, names) == {}
        embd, huge = f.raw("token_embd.weight"), repack_module.HUGE_PAGE
        beyond = [n for n in names if f.raw(n).ctypes.data // huge > (embd.ctypes.data + embd.size) // huge]
        assert len(beyond) > len(names) // 2  # the check covers most matrices
        assert len(_resident_pages(f, "token_embd.weight")) > 0


def _held_at(at: int, call: Callable[..., Any]) -> tuple[Callable[..., Any], threading.Event, threading.Event]:
    """`call` wrapped to hold its `at`-th call as it starts: (the wrapper; an event set once that
    call is held; an event that lets it go on)."""
    held, go_on = threading.Event(), threading.Event()
    calls = 0

    def wrapper(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == at:
            held.set()
            assert go_on.wait(60)
        return call(*args)

    return wrapper, held, go_on


def _hold_repacking(monkeypatch: pytest.MonkeyPatch, at: int) -> tuple[threading.Event, threading.Event]:
    """Hold the repacking thread before it asks for its `at`-th turn (its `at`-th matrix, unless
    a pass has repacked that one), without the lock: (the first event, set once it is held
    there; the second, which lets it go on)."""
    between_passes, held, go_on = _held_at(at, repack_module.ForwardLock.between_passes)
    monkeypatch.setattr(repack_module.ForwardLock, "between_passes", between_passes)
    return held, go_on


def _hold_in_repack(monkeypatch: pytest.MonkeyPatch, at: int) -> tuple[threading.Event, threading.Event]:
    """Hold the `at`-th copy of a Q4_0 matrix, by the thread or a pass, as it starts (the lock
    held): (the first event, set once it is held there; the second, which lets it go on)."""
    layout = repack_module.LAYOUTS[GGMLType.Q4_0]
    repack, held, go_on = _held_at(at, layout.repack)
    monkeypatch.setitem(repack_module.LAYOUTS, GGMLType.Q4_0, dataclasses.replace(layout, repack=repack))
    return held, go_on


def test_forward_passes_while_repacking_give_the_same_bits(
    q4_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repacking thread is held after 36 of the 72 matrices: the model then serves from both
    layouts at once, the file's pages of those 36 already given back; then forward passes run
    while the rest is repacked. Every pass gives the same bits, and in the end no page of a
    repacked matrix stays mapped (a pass that reads a matrix in a huge page of the file beside a
    released one maps that whole huge page back; releasing the second one drops it again)."""
    path, ids = q4_models["12 layers"], list(range(40, 90))
    assert len(ids) < repack_module.CATCH_UP_ROWS  # these passes take turns with the thread
    reference = _eval(path, ids, repack=False)
    half_done, go_on = _hold_repacking(monkeypatch, 37)
    with Model.load(path, n_ctx=256, repack=True) as model:
        assert half_done.wait(60)
        matrices = [getattr(block, field) for block in model.transformer.blocks for field, _ in MATRICES]
        repacked = [lin.name for lin in matrices if lin is not None and lin.repacked]
        assert len(repacked) == 36
        assert _stray_pages(model, repacked) == {}
        assert np.array_equal(model.eval(ids).view(np.uint32), reference.view(np.uint32))
        go_on.set()
        passes = 0
        while not model.wait_repacked(0):
            assert np.array_equal(model.eval(ids[:8]).view(np.uint32), reference[:8].view(np.uint32))
            passes += 1
        assert np.array_equal(model.eval(ids).view(np.uint32), reference.view(np.uint32))
        all_names = [name for name, info in model.gguf.tensors.items() if repack_module.repackable(info)]
        assert _stray_pages(model, all_names) == {}, passes


class _LayersSeeingTheRepacking:
    """A model's LayerStack that notes how many matrices served repacked at each forward pass."""

    def __init__(self, layers: object, repacking: repack_module.BackgroundRepack) -> None:
        self._layers, self._repacking = layers, repacking
        self.installed_at_each_pass: list[int] = []

    def forward(self, *args: object) -> None:
        self.installed_at_each_pass.append(self._repacking.installed)
        self._layers.forward(*args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._layers, name)


def test_a_prompt_pass_repacks_the_matrices_left_before_it_runs(
    q4_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The repacking thread is held before its second matrix: a pass of fewer than CATCH_UP_ROWS
    rows leaves the other 71 as they are, a pass of that many repacks them all before its layers
    run (the same bits), and the thread then finds nothing left to do."""
    path, rows = q4_models["12 layers"], repack_module.CATCH_UP_ROWS
    ids = list(range(40, 40 + rows))
    reference = _eval(path, ids, repack=False)
    second, go_on = _hold_repacking(monkeypatch, 2)
    with caplog.at_level(logging.INFO, logger="llmctl.runtime"):
        with Model.load(path, n_ctx=256, repack=True) as model:
            repacking = model.transformer.repacking
            assert repacking is not None and second.wait(60)
            assert repacking.installed == 1
            layers = _LayersSeeingTheRepacking(model.transformer.layers, repacking)
            model.transformer.layers = layers  # type: ignore[assignment]
            short = model.eval(ids[: rows - 1])
            assert repacking.installed == 1
            assert np.array_equal(short.view(np.uint32), reference[: rows - 1].view(np.uint32))
            assert np.array_equal(model.eval(ids).view(np.uint32), reference.view(np.uint32))
            assert repacking.complete and repacking.installed == 72 and repacking.error is None
            assert layers.installed_at_each_pass == [1, 72]
            assert model.wait_repacked(0)  # complete, though the thread has not ended yet
            matrices = [getattr(block, field) for block in model.transformer.blocks for field, _ in MATRICES]
            assert all(lin.repacked for lin in matrices if lin is not None)
            go_on.set()
            assert model.wait_repacked(60) and repacking.installed == 72
            all_names = [name for name, info in model.gguf.tensors.items() if repack_module.repackable(info)]
            assert _stray_pages(model, all_names) == {}
    assert caplog.text.count("repacked 72 matrices") == 1


def test_closing_a_model_stops_its_repacking(
    q4_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing while the second matrix is being repacked: that one takes over, no other does,
    and the thread has ended when close returns (the file is unmapped after it)."""
    second, go_on = _hold_in_repack(monkeypatch, 2)
    model = Model.load(q4_models["starcoder2"], n_ctx=64, repack=True)
    repacking = model.transformer.repacking
    assert repacking is not None and second.wait(60)
    closing = threading.Thread(target=model.close)
    with caplog.at_level(logging.INFO, logger="llmctl.runtime"):
        closing.start()
        go_on.set()
        closing.join(60)
    assert not closing.is_alive() and repacking.wait(0)
    assert repacking.installed == 2 and not repacking.complete and repacking.error is None
    matrices = [getattr(block, field) for block in model.transformer.blocks for field, _ in MATRICES]
    assert sum(lin.repacked for lin in matrices if lin is not None) == 2
    assert "repacked" not in caplog.text and "stopped" not in caplog.text


def test_a_failed_repacking_is_logged_and_the_model_serves_on(
    q4_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_memory(self: repack_module.Arena, total: int) -> None:
        raise MemoryError("cannot map 1 GiB")

    ids = list(range(10, 40))
    reference = _eval(q4_models["starcoder2"], ids, repack=False)
    monkeypatch.setattr(repack_module.Arena, "__init__", no_memory)
    with caplog.at_level(logging.WARNING, logger="llmctl.runtime"):
        with Model.load(q4_models["starcoder2"], n_ctx=256, repack=True) as model:
            assert not model.wait_repacked(60)  # ended, but nothing serves repacked
            repacking = model.transformer.repacking
            assert repacking is not None and repacking.wait(0) and repacking.installed == 0
            assert repacking.error == "MemoryError: cannot map 1 GiB"
            assert np.array_equal(model.eval(ids).view(np.uint32), reference.view(np.uint32))
    assert "repacking matrices stopped after 0 of" in caplog.text


def test_stopping_during_a_catch_up_ends_it_after_the_matrix_in_hand(
    q4_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The thread repacks the first matrix and is held before its second turn; a prompt pass
    catches up and is held in its fourth copy (the fifth matrix) when the repacking is stopped:
    that copy takes over, no other does, the pass runs with both layouts (the same bits) and the
    thread, let go, ends."""
    path, ids = q4_models["12 layers"], list(range(40, 40 + repack_module.CATCH_UP_ROWS))
    reference = _eval(path, ids, repack=False)
    second_turn, thread_on = _hold_repacking(monkeypatch, 2)
    fifth_copy, pass_on = _hold_in_repack(monkeypatch, 5)
    with caplog.at_level(logging.INFO, logger="llmctl.runtime"):
        with Model.load(path, n_ctx=256, repack=True) as model:
            repacking = model.transformer.repacking
            assert repacking is not None and second_turn.wait(60)
            logits: list[np.ndarray] = []
            prompt = threading.Thread(target=lambda: logits.append(model.eval(ids)))
            prompt.start()
            assert fifth_copy.wait(60) and repacking.installed == 4
            stopping = threading.Thread(target=repacking.stop)
            stopping.start()
            assert until(lambda: repacking._stop.is_set(), 60, every=0.001)
            thread_on.set()
            pass_on.set()
            prompt.join(60)
            stopping.join(60)
            assert not prompt.is_alive() and not stopping.is_alive() and repacking.wait(0)
            assert repacking.installed == 5 and not repacking.complete and repacking.error is None
            assert np.array_equal(logits[0].view(np.uint32), reference.view(np.uint32))
    assert "repacked" not in caplog.text and "stopped" not in caplog.text


def test_a_prompt_pass_that_cannot_repack_logs_it_and_runs_from_the_file(
    q4_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The repacking thread is held before its first turn, so the prompt pass is the first to map
    the copies' memory, and that fails: the pass logs it, gives the file layout's bits, and the
    thread, let go, repacks nothing."""

    def no_memory(self: repack_module.Arena, total: int) -> None:
        raise MemoryError("cannot map 1 GiB")

    path, ids = q4_models["starcoder2"], list(range(10, 10 + repack_module.CATCH_UP_ROWS))
    reference = _eval(path, ids, repack=False)
    first, go_on = _hold_repacking(monkeypatch, 1)
    monkeypatch.setattr(repack_module.Arena, "__init__", no_memory)
    with caplog.at_level(logging.WARNING, logger="llmctl.runtime"):
        with Model.load(path, n_ctx=256, repack=True) as model:
            repacking = model.transformer.repacking
            assert repacking is not None and first.wait(60)
            assert np.array_equal(model.eval(ids).view(np.uint32), reference.view(np.uint32))
            assert repacking.error == "MemoryError: cannot map 1 GiB" and repacking.installed == 0
            matrices = [getattr(block, field) for block in model.transformer.blocks for field, _ in MATRICES]
            assert not any(lin.repacked for lin in matrices if lin is not None)
            go_on.set()
            assert not model.wait_repacked(60) and repacking.wait(0) and repacking.installed == 0
    assert caplog.text.count("repacking matrices stopped after 0 of") == 1


def test_a_waiting_forward_pass_goes_before_the_next_matrix() -> None:
    """The repacking lets the lock go and asks for it again at once while a pass waits: the pass
    goes first (with a plain lock the repacking thread, still running, took it again)."""
    lock, order, holding, go_on = repack_module.ForwardLock(), [], threading.Event(), threading.Event()

    def repacking() -> None:
        with lock.between_passes():
            holding.set()
            assert go_on.wait(60)
        with lock.between_passes():
            order.append("matrix")

    def forward_pass() -> None:
        with lock:
            order.append("pass")

    threads = [threading.Thread(target=repacking), threading.Thread(target=forward_pass)]
    threads[0].start()
    assert holding.wait(60)
    threads[1].start()
    assert until(lambda: lock._passes_waiting == 1, 60, every=0.001)
    go_on.set()
    for t in threads:
        t.join(60)
    assert order == ["pass", "matrix"]


def test_a_waiting_repacking_goes_before_the_next_forward_pass() -> None:
    """Passes back to back do not shut the repacking out: when a pass ends with the repacking
    waiting, the next matrix goes before the next pass."""
    lock, order = repack_module.ForwardLock(), []

    def repacking() -> None:
        with lock.between_passes():
            order.append("matrix")

    def forward_pass() -> None:
        with lock:
            order.append("pass")

    with lock:
        threads = [threading.Thread(target=repacking), threading.Thread(target=forward_pass)]
        threads[0].start()
        assert until(lambda: lock._background_waiting, 60, every=0.001)
        threads[1].start()
        assert until(lambda: lock._passes_waiting == 1, 60, every=0.001)
    for t in threads:
        t.join(60)
    assert order == ["matrix", "pass"]
