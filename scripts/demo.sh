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

say "serving it: python -m runtime serve -m $MODEL (OpenAI and llama.cpp APIs on 127.0.0.1)"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PY" -m runtime serve -m "$MODEL" --port "$PORT" --parallel 2 --log-level warning --no-access-log &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; rm -f "$tmp"' EXIT
for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    sleep 0.2
done
say "POST /v1/completions with a suffix (fill-in-the-middle, as editors send it)"
curl -fsS "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "def add(a, b):\n    return ", "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 12, "temperature": 0}'
echo
kill -TERM "$SERVER"
wait "$SERVER"
say "server stopped cleanly"
