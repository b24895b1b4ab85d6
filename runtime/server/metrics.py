"""Prometheus metrics of one server (its own CollectorRegistry, so several apps can live in one
process), and the ASGI middleware that counts requests by endpoint and status."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _GaugeCollector(Collector):
    """Gauges read when scraped: queue depth and slots from the scheduler, whether the model is loaded."""

    def __init__(self, read: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        for name, (doc, value) in self._read().items():
            yield GaugeMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llmctl_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("llmctl_prompt_tokens", "Prompt tokens of generation requests", registry=r)
        self.cached_tokens = Counter(
            "llmctl_prompt_tokens_cached", "Prompt tokens reused from a slot's KV cache (shared prefix)", registry=r
        )
        self.generated_tokens = Counter("llmctl_generated_tokens", "Tokens generated", registry=r)
        self.finished = Counter(
            "llmctl_generations",
            "Generations ended, by reason (stop, length, cancelled, error)",
            ["reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmctl_time_to_first_token_seconds",
            "From a generation request's arrival at the scheduler to its first token (queue wait and prefill)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "llmctl_time_per_output_token_seconds",
            "Time between consecutive generated tokens of one request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        r.register(_GaugeCollector(gauges))


class RequestCounter:
    """Pure ASGI middleware (so streaming is untouched): counts every HTTP request under its route's
    path, or "other" for unknown paths so that scanners cannot blow up the label set."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self._paths = frozenset(known_paths)

    def _endpoint(self, path: str) -> str:
        return path if path in self._paths else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(self._endpoint(scope.get("path", "")), str(status)).inc()


def iter_samples(registry: CollectorRegistry) -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample: for tests and debugging."""
    for metric in registry.collect():
        for s in metric.samples:
            yield s.name, dict(s.labels), float(s.value)
