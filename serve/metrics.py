"""Prometheus metrics of the native server, on a private registry per app (tests build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ENERGY_BUCKETS = (-50.0, -40.0, -35.0, -30.0, -25.0, -20.0, -15.0, -10.0, -5.0, 0.0, 1.0, 2.0, 5.0, 10.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Request counts by endpoint/status, token counters, latency and TTFT histograms, load gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llmcomp_requests", "Requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("llmcomp_rejected_requests", "Requests refused because the queue was full",
                                registry=r)
        self.prompt_tokens = Counter("llmcomp_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llmcomp_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("llmcomp_request_latency_seconds", "End-to-end request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram("llmcomp_time_to_first_token_seconds", "Time to the first generated token",
                              ["endpoint"], buckets=TTFT_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("llmcomp_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.active = Gauge("llmcomp_active_sequences", "Sequences in the running batch", registry=r)
        self.routed = Counter("llmcomp_routed_requests", "Routed serving: choices answered, by model (swift, super)",
                              ["model"], registry=r)
        self.router_energy = Histogram("llmcomp_router_energy", "Routed serving: swift energy after prefill",
                                       buckets=ENERGY_BUCKETS, registry=r)
        self.deferrals = Counter("llmcomp_router_deferrals", "Routed serving: requests the swift model deferred "
                                 "to the super model (after prefill, or mid-generation in token mode)", registry=r)
        self.deferred_tokens = Counter("llmcomp_router_deferred_tokens", "Routed serving: tokens the super model "
                                       "produced", registry=r)
        self.worker_restarts = Counter("llmcomp_worker_restarts", "Model worker processes that died and were "
                                       "restarted, by cause (signal or exit status)", ["cause"], registry=r)

    def observe_route(self, model: str, energy: float | None, super_tokens: int = 0) -> None:
        """One routed choice: its model (swift, super, or mixed when the super model took over
        mid-generation), the first decision's energy, the tokens the super model produced."""
        self.routed.labels(model=model).inc()
        if energy is not None:
            self.router_energy.observe(energy)
        if model != "swift":
            self.deferrals.inc()
        self.deferred_tokens.inc(super_tokens)

    def render(self, waiting: int, active: int) -> bytes:
        self.queue_depth.set(waiting)
        self.active.set(active)
        return generate_latest(self.registry)
