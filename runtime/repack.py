"""Q4_0 and Q8_0 matrices repacked for the kernels' repacked tiles (REPACKED_Q4_0 and
REPACKED_Q8_0 in kernels.c), on a thread of their own while the model already serves, or by a
prompt's forward pass that finds some left (CATCH_UP_ROWS).

llama.cpp repacks Q4_0 weights at load by default; the runtime does too where its kernel set has
a tile for the repacked layout (`_kernels.repacks_q4_0()`: every SIMD set): the same bytes,
interleaved by groups of 16 rows, so that one vpdpbusd (or maddubs) works on 8 or 16 rows at once
and each row's block sum lands in its own lane. Q8_0 matrices are repacked by groups of 8 rows
where the set has a tile for that layout (`_kernels.repacks_q8_0()`: AVX-512), which keeps
ggml's vec_dot order with far fewer instructions per block. The results are the same bits as from
the file's layout, so a model can serve from the file at once and let each repacked matrix take
over when it is ready:
a load does not wait for the copies (a page fault per huge page of them, which on a virtual
machine can take seconds when the host backs the memory lazily).

The copies live in one anonymous mapping backed by huge pages. Once a copy has taken over, the
process drops the file's pages of that matrix (they stay in the page cache), so RSS stays near
the file's size throughout: the file plus one matrix.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.ggml_types import GGMLType
from runtime.gguf import GGUFFile, TensorInfo
from runtime.kernels import _kernels

if TYPE_CHECKING:  # runtime.ops reads LAYOUTS
    from runtime.ops import Linear

log = logging.getLogger("llmctl.runtime")

HUGE_PAGE = 2 << 20
ALIGN = 64  # each matrix starts on a cache line


@dataclass(frozen=True)
class Layout:
    """A weight type's repacked layout."""

    group_rows: int  # rows interleaved together (R16_ROWS, R8_ROWS in kernels.c)
    kernel_type: int  # the matmul's weight type for the repacked rows
    repack: Callable[[np.ndarray, int, np.ndarray, int], None]  # (rows, n_in, out, n_threads)
    has_tile: Callable[[], bool]  # the kernel set in use has a tile for the layout


LAYOUTS = {
    GGMLType.Q4_0: Layout(16, _kernels.Q4_0_R16, _kernels.repack_q4_0, _kernels.repacks_q4_0),
    GGMLType.Q8_0: Layout(8, _kernels.Q8_0_R8, _kernels.repack_q8_0, _kernels.repacks_q8_0),
}


def repackable(info: TensorInfo) -> bool:
    """A Q4_0 or Q8_0 matrix whose rows split into whole groups."""
    layout = LAYOUTS.get(info.ggml_type)
    return layout is not None and len(info.shape) == 2 and info.shape[0] % layout.group_rows == 0


def types_to_repack(repack: bool | None) -> frozenset[GGMLType]:
    """The weight types a model repacks: with `repack` None or True, those the kernel set in use
    has a tile for (the others would read the layout by a slower path); False, none."""
    if repack is False:
        return frozenset()
    return frozenset(t for t, layout in LAYOUTS.items() if layout.has_tile())


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class Arena:
    """Anonymous memory for `total` bytes of repacked matrices, on huge pages where the kernel
    allows, handed out in order."""

    def __init__(self, total: int) -> None:
        # One huge page of slack so that the matrices start on a huge page boundary; the slack
        # is never touched, so it costs address space only.
        self._memory = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._memory.madvise(mmap.MADV_HUGEPAGE)
        address = np.frombuffer(self._memory, dtype=np.uint8, count=1).ctypes.data
        self._next = (-address) % HUGE_PAGE
        self._end = self._next + total

    def reserve(self, rows: np.ndarray) -> np.ndarray:
        """Room for a copy of `rows` (uint8 [n_out, row_bytes]), not yet touched (no memory)."""
        if self._next + rows.size > self._end:
            raise ValueError(f"Arena: {rows.size} bytes do not fit")
        out = np.frombuffer(self._memory, dtype=np.uint8, count=rows.size, offset=self._next).reshape(rows.shape)
        self._next += _round_up(rows.size, ALIGN)
        return out


class ForwardLock:
    """The lock between forward passes and the repacking's takeovers, taken in turns.

    `with lock:` is a forward pass; `with lock.between_passes():` the repacking of one matrix.
    A pass that waits goes before the repacking's next matrix, and a repacking that waits goes
    before the next pass, so that a pass waits for at most one of the thread's matrices and the
    repacking gets on between back-to-back passes (a prompt pass that catches up, CATCH_UP_ROWS,
    holds the lock for all it repacks). With a plain lock the repacking thread, which took it again as
    soon as it let it go, kept a waiting pass out for many matrices: an 8-token prompt of a 3B
    Q8_0 model took up to 1.0 s instead of 0.2 while the matrices were repacked."""

    def __init__(self) -> None:
        self._state = threading.Condition()
        self._held = False
        self._passes_waiting = 0
        self._background_waiting = False
        self._background_next = False  # a pass ended while the repacking waited: its turn

    def __enter__(self) -> None:
        with self._state:
            self._passes_waiting += 1
            while self._held or self._background_next:
                self._state.wait()
            self._passes_waiting -= 1
            self._held = True

    def __exit__(self, *exc: object) -> None:
        with self._state:
            self._held = False
            self._background_next = self._background_waiting
            self._state.notify_all()

    @contextmanager
    def between_passes(self) -> Iterator[None]:
        """Hold the lock for background work (one thread's), in turn with the passes."""
        with self._state:
            self._background_waiting = True
            while self._held or (self._passes_waiting and not self._background_next):
                self._state.wait()
            self._background_waiting = self._background_next = False
            self._held = True
        try:
            yield
        finally:
            with self._state:
                self._held = False
                self._state.notify_all()


# CATCH_UP_ROWS. A forward pass of at least this many rows (a prompt) repacks every matrix left
# before it runs (`BackgroundRepack.catch_up`) instead of running them from the file's layout,
# where the prompt tiles are about half as fast, while the repacking gets one matrix per pass.
# With prompts back to back a server started on a 3B Q4_0 model stayed on the file's layout for
# about as many requests as it has matrices (180): on an AMD EPYC Zen 4 VM (2 threads) a
# 1,000-token prompt right after the first request took 19.4-21.2 s where a repacked model takes
# 11.0-11.9. A pass costs the repacking of all that is left, once: 0.75 s of one core for that
# model where fresh memory faults in quickly, 4-5 s on that VM (whose host backs memory lazily,
# 6 ms per 2 MiB), against 4.2 s saved per 512 prompt tokens there (9.9 s a pass from the file's
# layout, 5.7 repacked); a few rows a pass (decode) would not make up for it.
CATCH_UP_ROWS = 64


class BackgroundRepack:
    """Repacks the matrices `jobs` (tensors of `f`, as the model reads them now) one after another
    on a daemon thread. Each copy takes over through `install(job, copy)`, called with `lock` held
    (every forward pass holds it too, so none runs with half its matrices swapped; the two take it
    in turns), after which the file's pages of the matrix leave the process (no pass reads them
    any more). A forward pass may repack the rest itself (`catch_up`). A failure (out of
    memory...) is logged in `error` and stops the repacking; the matrices not yet repacked keep
    serving from the file, with the same results. `installed` counts the copies that took over."""

    def __init__(
        self,
        f: GGUFFile,
        jobs: Sequence[Linear],
        install: Callable[[Linear, np.ndarray], None],
        lock: ForwardLock,
        n_threads: int = 1,
    ) -> None:
        self.error: str | None = None
        self.installed = 0  # also the index of the next job; both change under `lock` only
        self._f = f
        self._jobs = list(jobs)
        self._install = install
        self._lock = lock
        self._n_threads = n_threads
        self._copies: list[np.ndarray] | None = None  # each job's room in the arena, once mapped
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmctl-repack", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            # Both copies of the matrix are resident from the copy until the file's pages are
            # released: no forward pass runs meanwhile, so that the peak RSS is the file's plus
            # one matrix or plus a pass's activations, not both (a Q8_0 3B server went 15 MiB
            # over its budget when a long prompt met a 40 MiB copy). A pass waits for at most
            # one matrix's copy.
            with self._lock.between_passes():
                if not self._repack_next(self._n_threads):
                    return

    def catch_up(self, n_threads: int) -> None:
        """Repack every matrix left, now, with `n_threads` threads: for a forward pass about to
        run many rows (CATCH_UP_ROWS), which holds the lock."""
        while self._repack_next(n_threads):
            pass

    def _repack_next(self, n_threads: int) -> bool:
        """Repack the next matrix and let it take over (with the lock held); False once there is
        none left, the repacking failed or it was stopped."""
        if self.error is not None or self.complete or self._stop.is_set():
            return False
        job = self._jobs[self.installed]
        try:
            if self._copies is None:
                arena = Arena(sum(_round_up(j.rows.size, ALIGN) for j in self._jobs))
                self._copies = [arena.reserve(j.rows) for j in self._jobs]
            copy = self._copies[self.installed]
            LAYOUTS[job.ggml_type].repack(job.rows, job.n_in, copy, n_threads)
            self._install(job, copy)
            self.installed += 1  # it serves repacked now, whatever the release does
            self._f.release(job.name)
        except Exception as e:  # MemoryError, OSError: serving goes on from the file's layout
            self.error = f"{type(e).__name__}: {e}"
            log.warning("repacking matrices stopped after %d of %d: %s", self.installed, self.total, self.error)
            return False
        if self.complete:
            n_bytes = sum(j.rows.size for j in self._jobs)
            seconds = time.monotonic() - self._start
            log.info("repacked %d matrices (%.0f MiB) in %.1f s", self.installed, n_bytes / 2**20, seconds)
        return True

    @property
    def total(self) -> int:
        """The matrices to repack."""
        return len(self._jobs)

    @property
    def complete(self) -> bool:
        """Every matrix serves repacked."""
        return self.installed == self.total

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the thread has ended: every matrix repacked, or the repacking failed (`error`)
        or was stopped; False on timeout."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop after the matrix in hand, the thread's or a catching-up pass's, and wait for the
        thread (before the file is unmapped)."""
        self._stop.set()
        self._thread.join()
