"""The runtime refuses weights that are not the pinned bytes: at the API and at `serve` start."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import ModelError
from runtime.testing.make_model import make_model
from runtime.verify import WeightsDigestError, parse_digest, verify_weights
from tests.netutil import free_port, wait_for_health

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def weights(tmp_path: Path) -> tuple[Path, str]:
    path = make_model(tmp_path / "m.gguf", preset="tiny", wtype="q8_0", seed=2)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_match_is_hashed_once_then_recorded(weights: tuple[Path, str], tmp_path: Path) -> None:
    path, digest = weights
    records = tmp_path / "records"
    assert verify_weights(path, f"sha256:{digest}", record_dir=records) is False  # hashed
    assert verify_weights(path, digest, record_dir=records) is True  # the record vouches
    assert verify_weights(path, digest, record_dir=records, rehash=True) is False  # asked to hash


def test_mismatch_is_refused_with_both_digests(weights: tuple[Path, str], tmp_path: Path) -> None:
    path, digest = weights
    wrong = "0" * 64
    with pytest.raises(WeightsDigestError, match=f"expected sha256:{wrong}, file has sha256:{digest}"):
        verify_weights(path, wrong, record_dir=tmp_path)


def test_a_changed_file_is_never_vouched_for_by_an_old_record(weights: tuple[Path, str], tmp_path: Path) -> None:
    path, digest = weights
    verify_weights(path, digest, record_dir=tmp_path)
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old modification time
    with pytest.raises(WeightsDigestError, match="mismatch"):
        verify_weights(path, digest, record_dir=tmp_path)


def test_bad_digest_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is not a sha256 digest"):
        parse_digest("sha256:xyz")
    with pytest.raises(ModelError, match="cannot read the weights file"):
        verify_weights(tmp_path / "nope.gguf", "a" * 64, record_dir=tmp_path)


def test_serve_refuses_a_mismatch_and_exits_1(weights: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = weights
    env = {**os.environ, "LLMCTL_VERIFY_DIR": str(tmp_path / "records")}
    cmd = [sys.executable, "-m", "runtime", "serve", "-m", str(path), "--port", str(free_port())]
    p = subprocess.run([*cmd, "--sha256", "1" * 64], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "weights digest mismatch" in p.stderr and "refusing to serve" in p.stderr
    bad = subprocess.run([*cmd, "--sha256", "nope"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "is not a sha256 digest" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_starts_when_the_digest_matches(weights: tuple[Path, str], tmp_path: Path) -> None:
    path, digest = weights
    port = free_port()
    env = {**os.environ, "LLMCTL_VERIFY_DIR": str(tmp_path / "records")}
    cmd = [sys.executable, "-m", "runtime", "serve", "-m", str(path), "--port", str(port), "--sha256", digest]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        status = wait_for_health(f"http://127.0.0.1:{port}", 60, alive=lambda: proc.poll() is None)
        assert status == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"weights match sha256:{digest} (hashed)" in err
