#!/usr/bin/env bash
# Install everything the demo and the tests need: Debian build tools, the .venv with the development
# requirements, llama-cpp-python (the numerical oracle, built once and cached as a wheel) and llmctl
# itself (editable, compiling the Cython kernels). Safe to re-run; a run with nothing to do takes
# a few seconds.
#
# Environment: PYTHON (default python3), XDG_CACHE_HOME (wheel cache under llmctl/wheels),
# CMAKE_ARGS (passed to the llama.cpp build as pip does).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PIP=("$PY" -m pip)
LLAMA_VERSION="0.3.36"
# The oracle is built for plain AVX2/FMA/F16C, not -march=native: its numerics are then the ones
# every AVX2 user of llama.cpp gets (and the runtime reproduces), and it avoids llama.cpp's AMX
# path, which crashes on batched Q8_0/Q4_0 matmuls on AMX CPUs (ggml-org/llama.cpp issue 20824).
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF"
WHEEL_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llmctl/wheels-avx2"
# docker-registry (distribution) and apache2-utils (htpasswd -B) let the tests run a real registry on loopback
APT_PACKAGES=(build-essential cmake ninja-build git curl docker-registry apache2-utils)

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '==> %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

CLEANUP=()
BUILD_PID=""
cleanup() {
    local p
    # An interrupted build must not go on in the background: stop its whole process group.
    if [ -n "$BUILD_PID" ]; then kill -TERM -- "-$BUILD_PID" 2>/dev/null || true; fi
    for p in "${CLEANUP[@]}"; do rm -rf -- "$p"; done
}
trap cleanup EXIT

# --- 1. Debian packages -------------------------------------------------------------------------

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python >= 3.11 (Debian: apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); llmctl needs Python >= 3.11 (set PYTHON=...)"

# Debian's own python3 needs two extra packages: venv (ensurepip) and the headers for the Cython build.
if [ "$("$PYTHON" -c 'import sys; print(sys.base_prefix)')" = /usr ]; then
    APT_PACKAGES+=(python3-venv python3-dev)
fi

apt_installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

if command -v dpkg-query >/dev/null; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        apt_installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        sudo=()
        if [ "$(id -u)" -ne 0 ]; then
            command -v sudo >/dev/null || die "missing Debian packages: ${missing[*]}; install them as root"
            sudo=(sudo)
        fi
        say "installing Debian packages: ${missing[*]}"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "Debian packages present"
    fi
else
    say "not a Debian system: make sure a C compiler, cmake, ninja and git are installed"
fi

# --- 2. virtualenv and development requirements -------------------------------------------------

if [ ! -x "$PY" ]; then
    say "creating .venv with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

req_hash="$(sha256sum requirements-dev.txt | cut -d' ' -f1)"
if [ "$(cat "$VENV/.llmctl-reqs" 2>/dev/null || true)" != "$req_hash" ]; then
    say "installing requirements-dev.txt"
    "${PIP[@]}" install -q -r requirements-dev.txt
    printf '%s\n' "$req_hash" >"$VENV/.llmctl-reqs"
else
    say "requirements-dev.txt satisfied"
fi

# --- 3. llama-cpp-python, the reference implementation -------------------------------------------

llama_ok() {
    "$PY" -c '
import importlib.metadata as md, sys
if md.version("llama-cpp-python") != sys.argv[1]:
    sys.exit(1)
import llama_cpp  # loads libllama: proves the build works here
info = llama_cpp.llama_print_system_info().decode()
if "AVX2 = 1" not in info or "AVX512" in info or "AMX" in info:
    sys.exit(1)  # a -march=native build: not the oracle the tests expect
' "$LLAMA_VERSION" >/dev/null 2>&1
}

have_cached_wheel() { compgen -G "$WHEEL_CACHE/llama_cpp_python-$LLAMA_VERSION-*.whl" >/dev/null; }

build_llama_wheel() {
    local tmp log pid start
    tmp="$(mktemp -d "$WHEEL_CACHE/.build.XXXXXX")"
    CLEANUP+=("$tmp")
    log="$WHEEL_CACHE/llama-cpp-python-$LLAMA_VERSION-build.log"
    say "building llama-cpp-python $LLAMA_VERSION from source: takes ~15 minutes, once (log: $log)"
    start=$SECONDS
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS ${CMAKE_ARGS:-}" setsid "${PIP[@]}" wheel -v --no-cache-dir --no-deps \
        "llama-cpp-python==$LLAMA_VERSION" -w "$tmp" >"$log" 2>&1 &
    pid=$!
    BUILD_PID=$pid
    local next=$(( start + 60 ))
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        if (( SECONDS >= next )); then
            printf '    ... still building (%d min)\n' $(( (SECONDS - start) / 60 ))
            next=$(( next + 60 ))
        fi
    done
    if ! wait "$pid"; then
        BUILD_PID=""
        tail -n 40 "$log" >&2
        die "building llama-cpp-python failed; full log: $log"
    fi
    BUILD_PID=""
    # Publish atomically: other clones look for the finished wheel in the cache.
    mv "$tmp"/llama_cpp_python-*.whl "$WHEEL_CACHE/"
    say "built llama-cpp-python in $(( (SECONDS - start) / 60 )) min"
}

if llama_ok; then
    say "llama-cpp-python $LLAMA_VERSION present"
else
    mkdir -p "$WHEEL_CACHE"
    # A build started by hand (or by another clone) may be writing the wheel right now: wait for it.
    if pgrep -f "pip wheel.*llama-cpp-python" >/dev/null; then
        say "waiting for a running llama-cpp-python build to finish"
        while pgrep -f "pip wheel.*llama-cpp-python" >/dev/null; do sleep 10; done
    fi
    exec 9>"$WHEEL_CACHE/.llama-cpp-python.lock"
    flock 9
    have_cached_wheel || build_llama_wheel
    flock -u 9
    say "installing llama-cpp-python $LLAMA_VERSION from $WHEEL_CACHE"
    "${PIP[@]}" install -q 'typing-extensions>=4.5' 'diskcache>=5.6.1' 'jinja2>=2.11.3' 'numpy>=1.20'
    "${PIP[@]}" install -q --no-deps --no-index --find-links "$WHEEL_CACHE" \
        --force-reinstall "llama-cpp-python==$LLAMA_VERSION"
    llama_ok || die "llama-cpp-python installed but 'import llama_cpp' fails; delete $WHEEL_CACHE/llama_cpp_python-$LLAMA_VERSION-*.whl and re-run"
fi

# --- 4. llmctl itself (editable; compiles the Cython kernels in place) ---------------------------

# Fingerprint of everything that needs a rebuild when it changes: packaging files, Cython and C
# sources. A .pyx without its compiled module beside it forces a rebuild too.
build_fingerprint() {
    "$PY" - <<'EOF'
import hashlib
import sys
import sysconfig
from pathlib import Path

files = [Path(p) for p in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in") if Path(p).is_file()]
sources = []
for package in ("runtime", "registry", "manager"):
    if Path(package).is_dir():
        for p in Path(package).rglob("*"):
            generated = p.suffix == ".c" and p.with_suffix(".pyx").exists()
            if p.suffix in (".pyx", ".pxd", ".pxi", ".c", ".h") and not generated:
                sources.append(p)
digest = hashlib.sha256(sys.version.encode())
for p in sorted(files + sources):
    digest.update(str(p).encode() + b"\0" + p.read_bytes())
ext = sysconfig.get_config_var("EXT_SUFFIX")
unbuilt = [p for p in sources if p.suffix == ".pyx" and not p.with_name(p.stem + ext).exists()]
print(digest.hexdigest() + ("-unbuilt" if unbuilt else ""))
EOF
}

if [ ! -f pyproject.toml ] && [ ! -f setup.py ]; then
    say "no pyproject.toml yet: skipping the llmctl build"
elif [ "$(cat "$VENV/.llmctl-build" 2>/dev/null || true)" = "$(build_fingerprint)" ]; then
    say "llmctl build up to date"
else
    say "building llmctl (editable, Cython kernels)"
    rm -f "$VENV/.llmctl-build"
    "${PIP[@]}" install -q --no-build-isolation --no-deps -e .
    build_fingerprint >"$VENV/.llmctl-build"
fi

say "ready ($SECONDS s)"
