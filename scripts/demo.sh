#!/usr/bin/env bash
# The demo, end to end on the embedded default: generate a tiny StarCoder2-shaped model (random
# weights, a tokenizer trained on real code), build its image, sign it, verify it, install it as a
# release, complete code through the OpenAI client with fill-in-the-middle, upgrade it with new
# values, roll it back and uninstall it. Run through `make demo`, which installs everything first.
#
# It keeps its own llmctl home (keys, images, releases) so it never touches yours:
# DEMO_HOME (default ~/.local/share/llmctl-demo). The driver is docker when the engine answers,
# else a supervised local process; DEMO_DRIVER=process|docker chooses.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="$ROOT/.venv/bin/python"
LLMCTL="$ROOT/.venv/bin/llmctl"
export LLMCTL_HOME="${DEMO_HOME:-$HOME/.local/share/llmctl-demo}"
export LLMCTL_KEY_PASSWORD="${LLMCTL_KEY_PASSWORD:-llmctl-demo}"  # the demo key's password, demo only
MODEL="$LLMCTL_HOME/demo-q8_0.gguf"
RELEASE=demo
DRIVER=(${DEMO_DRIVER:+--driver "$DEMO_DRIVER"})

step=0
say() { step=$((step + 1)); printf '\n==> %d. %s\n' "$step" "$*"; }
run() { printf '$ %s\n' "$*" >&2; "$@"; }

[ -x "$LLMCTL" ] || { echo "demo: .venv is missing; run 'make demo'" >&2; exit 1; }
mkdir -p "$LLMCTL_HOME"
# a release left by an interrupted earlier run goes first, so the demo always starts clean
"$LLMCTL" uninstall "$RELEASE" >/dev/null 2>&1 || true

say "generate the demo weights (tiny StarCoder2 shape, Q8_0, seed 1): $MODEL"
tmp="$LLMCTL_HOME/.demo-q8_0.$$.gguf"
trap 'rm -f "$tmp"' EXIT
"$PY" -m runtime.testing.make_model --arch starcoder2 --preset tiny --type q8_0 --seed 1 -o "$tmp"
mv -f "$tmp" "$MODEL"
DIGEST="sha256:$(sha256sum "$MODEL" | cut -d' ' -f1)"
VALUES=(--set "weights.path=$MODEL" --set "weights.sha256=$DIGEST")
run "$LLMCTL" model info "$MODEL"

say "a signing key in cosign's format (once)"
if [ -f "$LLMCTL_HOME/config/keys/cosign.pub" ]; then
    run "$LLMCTL" key ls
else
    run "$LLMCTL" key generate
fi

say "render the demo chart's Model manifest"
run "$LLMCTL" template demo "${VALUES[@]}" | tee "$LLMCTL_HOME/demo-manifest.yaml"

say "build the image, sign it, attest its SBOM and SLSA provenance (reproducible: same digest every time)"
run "$LLMCTL" build "$LLMCTL_HOME/demo-manifest.yaml" --no-load --no-progress

say "verify it like cosign would: signature, attestations, weights in the image vs the signed SBOM"
run "$LLMCTL" verify llmctl/demo:1.0.0 --key "$LLMCTL_HOME/config/keys/cosign.pub"

say "install it as release '$RELEASE' (the verified image is reused; waits for /health)"
run "$LLMCTL" install "$RELEASE" demo "${VALUES[@]}" "${DRIVER[@]}"
ENDPOINT="$("$LLMCTL" status "$RELEASE" -o json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["endpoint"])')"

say "fill in the middle through the OpenAI client (the weights are random, so the text is too)"
"$PY" - "$ENDPOINT" <<'EOF'
import sys

from openai import OpenAI

client = OpenAI(base_url=f"{sys.argv[1]}/v1", api_key="not-needed")
prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
r = client.completions.create(model="demo", prompt=prefix, suffix=suffix, max_tokens=12, temperature=0)
print(f"prompt:  {prefix!r}\nsuffix:  {suffix!r}\nmiddle:  {r.choices[0].text!r} ({r.usage.completion_tokens} tokens)")
EOF

say "upgrade with new values (4 parallel requests): the new revision starts, passes /health, then replaces the old"
run "$LLMCTL" upgrade "$RELEASE" demo --reuse-values --set server.parallel=4
run "$LLMCTL" history "$RELEASE"

say "roll back to revision 1"
run "$LLMCTL" rollback "$RELEASE" 1
run "$LLMCTL" list

say "uninstall"
run "$LLMCTL" uninstall "$RELEASE"
printf '\ndemo complete: built, signed, verified, installed, queried, upgraded, rolled back and uninstalled.\n'
