"""Write the charts llmctl ships from one table, so that every chart has the same template.

Run `python charts/generate.py` after changing this file; `tests/test_shipped_charts.py` fails when
the checked-in charts differ from what this writes. Digests come from
../shared/reference/weights-catalog.md (Tabby's public model registry pins the same files).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
LICENSE_URL = "https://huggingface.co/spaces/bigcode/bigcode-model-license-agreement"
CHART_VERSION = "1.0.0"


@dataclass(frozen=True)
class Model:
    chart: str
    title: str
    architecture: str
    context: int  # training context length (GGUF <arch>.context_length)
    url: str
    sha256: str
    size: int | None
    card: str
    requantize: str | None = None


def _q8(chart: str, title: str, arch: str, ctx: int, url: str, sha: str, card: str) -> Model:
    return Model(chart, title, arch, ctx, url, f"sha256:{sha}", None, card)


REAL = [
    _q8(
        "starcoder2-3b",
        "StarCoder2-3B",
        "starcoder2",
        16384,
        "https://huggingface.co/nold/starcoder2-3b-GGUF/resolve/main/starcoder2-3b_Q8_0.gguf",
        "0499b8d046c56934c9741fd00c6206a5f7ca0eb42b59304ab7f4a20cd2f28ebf",
        "https://huggingface.co/bigcode/starcoder2-3b",
    ),
    _q8(
        "starcoder2-7b",
        "StarCoder2-7B",
        "starcoder2",
        16384,
        "https://huggingface.co/nold/starcoder2-7b-GGUF/resolve/main/starcoder2-7b_Q8_0.gguf",
        "72a8a59486cdcc8549e5a17a5c5ec66b6ce5db71a9408a2800985791a40fbff0",
        "https://huggingface.co/bigcode/starcoder2-7b",
    ),
    _q8(
        "starcoderbase-1b",
        "StarCoderBase-1B",
        "starcoder",
        8192,
        "https://huggingface.co/TabbyML/models/resolve/main/starcoderbase-1B.Q8_0.gguf",
        "1bb6441486d102db03dac30c82d6b1029ee4f9f5d73f27444fa58cbfcd7cfa0f",
        "https://huggingface.co/bigcode/starcoderbase-1b",
    ),
    _q8(
        "starcoderbase-3b",
        "StarCoderBase-3B",
        "starcoder",
        8192,
        "https://huggingface.co/TabbyML/models/resolve/main/starcoderbase-3B.Q8_0.gguf",
        "9798b7cba84ade7c69ff9f033d60c954e16b18f4d01829993b5fe7e33a49ba81",
        "https://huggingface.co/bigcode/starcoderbase-3b",
    ),
    _q8(
        "starcoderbase-7b",
        "StarCoderBase-7B",
        "starcoder",
        8192,
        "https://huggingface.co/TabbyML/models/resolve/main/starcoderbase-7B.Q8_0.gguf",
        "33dfcc7e216f1a072b4e16cd3bb19a0e55f5874ed319416435c8fc99216b8bfa",
        "https://huggingface.co/bigcode/starcoderbase-7b",
    ),
]
# No Q4 digests are published: derive Q4_0 from the pinned Q8_0 file, deterministically.
DERIVED = [
    Model(**{**m.__dict__, "chart": m.chart + "-q4", "requantize": "Q4_0"})
    for m in REAL
    if m.chart.startswith("starcoder2")
]

TEMPLATE = """\
{#- The Model manifest of this chart: llmctl builds, signs and runs the image it describes. -#}
apiVersion: llmctl.dev/v1
kind: Model
metadata:
  name: {{ Chart.Name }}
  version: {{ Chart.Version | quote }}
  description: {{ Chart.Description | quote }}
spec:
  architecture: %(architecture)s
  quantization: %(quantization)s
  contextLength: %(context)d
  license: bigcode-openrail-m
  source: %(card)s
  files:
%(files)s
%(derive)s  storage: {{ Values.weights.storage | quote }}
  fim: {prefix: "<fim_prefix>", suffix: "<fim_suffix>", middle: "<fim_middle>"}
  server: {{ Values.server | tojson }}
  resources: {{ Values.resources | tojson }}
  network: {{ Values.network | tojson }}
  security: {{ Values.security | tojson }}
  image: {{ Values.image | tojson }}
"""

# the digest is part of the chart, not of its values: a mirror may move the file, never change it
PINNED_FILE = """\
    - url: {{ Values.weights.url | quote }}
      sha256: "%(sha256)s"\
"""
# the demo model is generated on the machine that installs it (`make demo`), so its digest is a value
DEMO_FILE = """\
    - path: {{ required(Values.weights.path, "set weights.path to a generated model (charts/demo/README.md)") | quote }}
      sha256: {{ required(Values.weights.sha256, "set weights.sha256 to the digest of weights.path") | quote }}\
"""

VALUES = """\
# Values of the %(chart)s chart. Override with -f values.yaml or --set key=value.
weights:
%(weights)s
  # image: baked into the image (one artifact to carry into an air-gapped site);
  # mount: mounted read-only from the local cache at run time (big models, no second copy)
  storage: image
server:
  threads: null      # CPU threads per instance (null: all the cores the instance may use)
  context: %(server_context)d      # tokens per request the server keeps (at most the model's %(context)d)
  parallel: 2        # requests decoded together
  repack: true       # repack Q4_0/Q8_0 weights for speed after load (false: the file's layout, no extra CPU at start)
resources:
  cpus: null         # CPU limit (docker driver), e.g. 2 or 1.5
  memory: null       # memory limit (docker driver), e.g. 8g
network:
  host: 127.0.0.1    # the host address the endpoint binds; never exposed beyond this machine unless you say so
  port: 0            # host port; 0 picks a free one (llmctl status shows it)
security:
  apiKeyEnv: null    # name of an environment variable holding an API key clients must send
# a signed image of this model in your registry (registry:port/repo:tag or @sha256:...), built once
# by your platform team: install pulls and verifies it instead of building one here
image: null
"""


def values_schema(demo: bool) -> dict[str, object]:
    nullable_int = {"type": ["integer", "null"], "minimum": 1}
    weights: dict[str, object] = {
        "storage": {"enum": ["image", "mount"]},
    }
    if demo:
        weights["path"] = {"type": ["string", "null"]}
        weights["sha256"] = {"type": ["string", "null"], "pattern": "^sha256:[0-9a-f]{64}$"}
    else:
        weights["url"] = {"type": "string", "pattern": "^(https?|file)://"}

    def obj(props: dict[str, object], required: list[str] | None = None) -> dict[str, object]:
        out: dict[str, object] = {"type": "object", "additionalProperties": False, "properties": props}
        if required:
            out["required"] = required
        return out

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "values",
        **obj(
            {
                "weights": obj(weights),
                "server": obj(
                    {
                        "threads": nullable_int,
                        "context": {"type": "integer", "minimum": 16},
                        "parallel": {"type": "integer", "minimum": 1, "maximum": 256},
                        "repack": {"type": "boolean"},
                    }
                ),
                "resources": obj(
                    {
                        "cpus": {"type": ["number", "null"], "exclusiveMinimum": 0},
                        "memory": {"type": ["string", "null"], "pattern": "^[0-9]+[kmg]?$"},
                    }
                ),
                "network": obj(
                    {
                        "host": {"type": "string", "minLength": 1},
                        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
                    }
                ),
                "security": obj({"apiKeyEnv": {"type": ["string", "null"], "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}}),
                "image": {"type": ["string", "null"], "minLength": 1},
            },
            ["weights", "server", "resources", "network", "security"],
        ),
    }


def chart_yaml(name: str, description: str, app_version: str, keywords: list[str]) -> str:
    return (
        "apiVersion: llmctl.dev/v1\n"
        f"name: {name}\n"
        f"version: {CHART_VERSION}\n"
        f'appVersion: "{app_version}"\n'
        f"description: {json.dumps(description)}\n"
        f"keywords: [{', '.join(keywords)}]\n"
        "license: bigcode-openrail-m\n"
    )


def readme(m: Model) -> str:
    derived = (
        f"\nNo Q4 file with a published digest exists, so llmctl derives it: it downloads the pinned Q8_0 file "
        f"and requantizes it to {m.requantize} with its deterministic requantizer (the same bytes on every machine). "
        "The image's SLSA provenance records both digests.\n"
        if m.requantize
        else ""
    )
    return (
        f"# {m.chart}\n\n{m.title} ({m.card}) served by the llmctl runtime: OpenAI- and llama.cpp-compatible "
        "completions with fill-in-the-middle.\n\n"
        f"- weights: `{m.url}`\n- pinned sha256: `{m.sha256}`\n- licence: bigcode-openrail-m ({LICENSE_URL})\n"
        f"{derived}\n"
        f"```\nllmctl install mymodel {m.chart}\nllmctl install mymodel {m.chart} --set weights.url=https://mirror.internal/"
        f"{m.url.rsplit('/', 1)[1]}\n```\n\nSee `llmctl show values {m.chart}` for every setting.\n"
    )


def files(m: Model | None) -> dict[str, str]:
    """The files of one chart (None: the demo chart)."""
    if m is None:
        name, description = "demo", "A tiny generated StarCoder2-shaped model that runs anywhere, offline"
        weights = (
            "  path: null         # the generated GGUF file (make demo writes one)\n  sha256: null       # its digest"
        )
        template = TEMPLATE % {
            "architecture": "starcoder2",
            "quantization": "Q8_0",
            "context": 512,
            "card": "https://github.com/llmctl/llmctl/tree/main/charts/demo",
            "files": DEMO_FILE,
            "derive": "",
        }
        values = VALUES % {"chart": name, "weights": weights, "server_context": 512, "context": 512}
        keywords = ["demo", "starcoder2", "offline", "fim"]
        doc = (
            "# demo\n\nA tiny StarCoder2-shaped model with random weights and a tokenizer trained on real code: it "
            "exercises the whole path (build, sign, verify, install, query) offline, in seconds. Its completions are "
            "noise.\n\n```\n.venv/bin/python -m runtime.testing.make_model -o /tmp/demo.gguf "
            "--preset tiny --type q8_0 --seed 1\n"
            "llmctl install demo demo --set weights.path=/tmp/demo.gguf --set weights.sha256=sha256:$(sha256sum "
            "/tmp/demo.gguf | cut -d' ' -f1)\n```\n\n`make demo` does exactly this.\n"
        )
        return {
            "Chart.yaml": chart_yaml(name, description, "0.1.0", keywords),
            "values.yaml": values,
            "values.schema.json": json.dumps(values_schema(True), indent=2) + "\n",
            "templates/model.yaml": template,
            "README.md": doc,
        }
    quant = m.requantize or "Q8_0"
    template = TEMPLATE % {
        "architecture": m.architecture,
        "quantization": quant,
        "context": m.context,
        "card": m.card,
        "files": PINNED_FILE % {"sha256": m.sha256},
        "derive": f"  derive: {{requantize: {m.requantize}}}\n" if m.requantize else "",
    }
    weights = f"  url: {m.url}"
    values = VALUES % {"chart": m.chart, "weights": weights, "server_context": 4096, "context": m.context}
    family = m.chart.split("-", 1)[0]
    keywords = [family, "code", "fim", quant.lower(), m.chart.split("-")[1]]
    description = f"{m.title} {quant}: code completion with fill-in-the-middle"
    return {
        "Chart.yaml": chart_yaml(m.chart, description, quant, keywords),
        "values.yaml": values,
        "values.schema.json": json.dumps(values_schema(False), indent=2) + "\n",
        "templates/model.yaml": template,
        "README.md": readme(m),
    }


def all_charts() -> dict[str, dict[str, str]]:
    charts: dict[str, dict[str, str]] = {m.chart: files(m) for m in [*REAL, *DERIVED]}
    charts["demo"] = files(None)
    return charts


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else HERE
    for chart, contents in all_charts().items():
        for rel, text in contents.items():
            path = root / chart / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    print(f"wrote {len(all_charts())} charts under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
