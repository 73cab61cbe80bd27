"""Prometheus metrics. One registry per app, so several servers (tests) can live in one process.

Engine-side values are set from the engine thread and HTTP-side ones from the event loop;
prometheus-client's metrics are thread-safe.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TPF_BUCKETS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.waiting = Gauge("unmask_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("unmask_running_requests", "Requests in the running batch", registry=r)
        self.pending = Gauge("unmask_pending_requests", "Requests accepted by the server and not yet answered",
                             registry=r)
        self.free_pages = Gauge("unmask_kv_free_pages", "Free pages of the paged KV cache", registry=r)
        self.prompt_tokens = Counter("unmask_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("unmask_completion_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.nfe = Counter("unmask_forward_passes", "Model forward passes (NFE) of finished requests", registry=r)
        self.steps = Counter("unmask_engine_steps", "Batched engine steps", registry=r)
        self.lookahead_rows = Counter("unmask_lookahead_rows", "Block lookahead rows run (engine/lookahead.py)",
                                      registry=r)
        self.lookahead_hits = Counter("unmask_lookahead_hits",
                                      "Block lookahead rows whose guess held: a forward saved", registry=r)
        self.tpf = Histogram("unmask_tokens_per_forward", "Tokens per forward (TPF) per request",
                             buckets=TPF_BUCKETS, registry=r)
        self.latency = Histogram("unmask_request_latency_seconds", "Request latency, arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("unmask_time_to_first_token_seconds", "Arrival to the first committed token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("unmask_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.http = Counter("unmask_http_responses", "HTTP responses by endpoint and status",
                            ["endpoint", "status"], registry=r)

    def finished(self, out) -> None:
        self.requests.labels(out.finish_reason or "error").inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        self.completion_tokens.inc(out.completion_tokens)
        self.nfe.inc(out.nfe)
        if out.nfe:
            self.tpf.observe(out.tokens_per_forward)
        self.latency.observe(out.seconds)
        if out.ttft is not None:
            self.ttft.observe(out.ttft)

    def render(self) -> bytes:
        return generate_latest(self.registry)
