#!/usr/bin/env bash
# The demo: make a tiny StarCoder2-architecture model (random weights, real tokenizer), show what is
# in it, and complete a line of code with llmctl's own runtime. Run through `make demo`, which
# installs everything first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="$ROOT/.venv/bin/python"
DEMO_DIR="${DEMO_DIR:-${LLMCTL_HOME:-$HOME/.local/share/llmctl}/demo}"
MODEL="$DEMO_DIR/demo-q8_0.gguf"

say() { printf '==> %s\n' "$*"; }

[ -x "$PY" ] || { echo "demo: .venv is missing; run 'make demo'" >&2; exit 1; }

mkdir -p "$DEMO_DIR"
# Made afresh each run (it is tiny), so it always matches the runtime in this checkout. Written
# beside the target and renamed, so an interrupted run never leaves half a model behind.
say "making the demo model: $MODEL"
tmp="$DEMO_DIR/.demo-q8_0.$$.gguf"
trap 'rm -f "$tmp"' EXIT
"$PY" -m runtime.testing.make_model --arch starcoder2 --preset tiny --type q8_0 --seed 1 -o "$tmp"
mv -f "$tmp" "$MODEL"

say "python -m runtime info $MODEL"
"$PY" -m runtime info "$MODEL"

say "completing 'def fibonacci(n):' (the weights are random, so the text is too)"
"$PY" -m runtime generate -m "$MODEL" -p 'def fibonacci(n):' -n 32 --seed 1

say "filling in the middle between a prefix and a suffix (<fim_prefix>...<fim_suffix>...<fim_middle>)"
"$PY" -m runtime generate -m "$MODEL" -p 'def add(a, b):
    return ' --infill-suffix '

print(add(1, 2))
' -n 16 --seed 1
