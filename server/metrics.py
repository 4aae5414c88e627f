"""Prometheus collectors of the server, fed by the engine thread.

Every series has the prefix `specvlm_` and a `model_name` label. The collectors are
raw counters, gauges and histograms, and counters count committed work only, so
`specvlm_generation_tokens_total` equals the sum of `usage.completion_tokens`. Derived
rates belong in PromQL:

    # Mean accepted length (MAL): committed tokens per step. 1.0 means no gain.
    1 + rate(specvlm_spec_decode_num_accepted_tokens_total[5m])
      / rate(specvlm_spec_decode_num_drafts_total[5m])

    # Acceptance rate: accepted tokens per draft token.
    rate(specvlm_spec_decode_num_accepted_tokens_total[5m])
      / rate(specvlm_spec_decode_num_draft_tokens_total[5m])

    # Acceptance rate at each draft depth (position 0 is the first draft token).
    rate(specvlm_spec_decode_num_accepted_tokens_per_pos_total[5m])
      / ignoring(position) group_left rate(specvlm_spec_decode_num_drafts_total[5m])

    # Output tokens per second, and prompt tokens per second.
    rate(specvlm_generation_tokens_total[1m])
    rate(specvlm_prompt_tokens_total[1m])

    # Share of the draft's visual tokens kept by the compressor.
    rate(specvlm_visual_tokens_total{model="draft"}[5m])
      / ignoring(model) rate(specvlm_visual_tokens_total{model="target"}[5m])

    # 95th percentile time to first token.
    histogram_quantile(0.95, sum by (le, model_name) (rate(specvlm_time_to_first_token_seconds_bucket[5m])))

    # Finished requests per second by finish reason.
    sum by (finished_reason) (rate(specvlm_request_success_total[1m]))

All methods are safe to call from any thread, because prometheus-client locks its values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "specvlm_"

# Bucket upper bounds in seconds.
TIME_TO_FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
REQUEST_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Label values created up front, so their series exist (at 0) before the first event.
FINISHED_REASONS = ("stop", "length")
VISUAL_TOKEN_MODELS = ("target", "draft")


class Metrics:
    """The collectors of one served model, registered on `registry` (a new one by default)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = {"model_name": model_name}

        def counter(name: str, documentation: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, documentation, ["model_name", *extra], registry=self.registry)

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, documentation, ["model_name"], buckets=buckets, registry=self.registry)

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(PREFIX + name, documentation, ["model_name"], registry=self.registry)

        self.num_requests_running = gauge("num_requests_running", "Requests that own a KV cache slot.").labels(**labels)
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests queued for a slot.").labels(**labels)
        self.kv_cache_usage_perc = gauge(
            "kv_cache_usage_perc", "Fraction of KV cache positions in use, 0 to 1."
        ).labels(**labels)

        self.request_success = counter(
            "request_success", "Finished requests by finish reason.", ("finished_reason",)
        )
        for reason in FINISHED_REASONS:
            self.request_success.labels(finished_reason=reason, **labels)
        self.num_aborted_requests = counter(
            "num_aborted_requests", "Requests aborted before they finished (client gone)."
        ).labels(**labels)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled, visual tokens included.").labels(
            **labels
        )
        self.generation_tokens = counter("generation_tokens", "Committed output tokens.").labels(**labels)
        self.visual_tokens = counter(
            "visual_tokens", "Visual tokens prefilled, by model (target, or draft after the compressor).", ("model",)
        )
        self._visual_tokens = {
            model: self.visual_tokens.labels(model=model, **labels) for model in VISUAL_TOKEN_MODELS
        }

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Seconds from arrival to the first output token.", TIME_TO_FIRST_TOKEN_BUCKETS
        ).labels(**labels)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Seconds between output tokens. A step that commits n tokens records n observations of interval / n.",
            INTER_TOKEN_LATENCY_BUCKETS,
        ).labels(**labels)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Seconds from arrival to the last output token.", REQUEST_LATENCY_BUCKETS
        ).labels(**labels)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Seconds from arrival to admission into a slot.", REQUEST_LATENCY_BUCKETS
        ).labels(**labels)

        self.spec_decode_num_drafts = counter("spec_decode_num_drafts", "Draft trees verified.").labels(**labels)
        self.spec_decode_num_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Draft tokens proposed for verification."
        ).labels(**labels)
        self.spec_decode_num_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted by the target (bonus tokens excluded)."
        ).labels(**labels)
        self.spec_decode_num_accepted_tokens_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by position on the accepted path, 0 being the first.",
            ("position",),
        )
        self.compressor_selected = counter(
            "compressor_selected", "Compressor primitive chosen for the draft's visual tokens.", ("primitive",)
        )

    def set_queue(self, running: int, waiting: int) -> None:
        self.num_requests_running.set(running)
        self.num_requests_waiting.set(waiting)

    def set_kv_cache_usage(self, fraction: float) -> None:
        self.kv_cache_usage_perc.set(fraction)

    def on_admitted(
        self, prompt_tokens: int, target_visual_tokens: int, draft_visual_tokens: int, queue_seconds: float
    ) -> None:
        """Record one request that got a slot and was prefilled."""
        self.prompt_tokens.inc(prompt_tokens)
        self._visual_tokens["target"].inc(target_visual_tokens)
        self._visual_tokens["draft"].inc(draft_visual_tokens)
        self.request_queue_time.observe(queue_seconds)

    def on_first_token(self, seconds_since_arrival: float) -> None:
        self.time_to_first_token.observe(seconds_since_arrival)

    def on_tokens(self, num_tokens: int, interval_seconds: float) -> None:
        """Record `num_tokens` committed tokens that took `interval_seconds` since the previous ones.

        The interval is 0 for a request's first tokens, which have no inter-token latency.
        """
        self.generation_tokens.inc(num_tokens)
        if interval_seconds > 0 and num_tokens > 0:
            per_token = interval_seconds / num_tokens
            for _ in range(num_tokens):
                self.inter_token_latency.observe(per_token)

    def on_spec_step(self, num_draft_tokens: int, accepted_per_position: list[int]) -> None:
        """Record one verified draft, where `accepted_per_position[i]` counts accepted tokens at position i."""
        self.spec_decode_num_drafts.inc()
        self.spec_decode_num_draft_tokens.inc(num_draft_tokens)
        self.spec_decode_num_accepted_tokens.inc(sum(accepted_per_position))
        for position, accepted in enumerate(accepted_per_position):
            self.spec_decode_num_accepted_tokens_per_pos.labels(
                model_name=self.model_name, position=str(position)
            ).inc(accepted)

    def on_finished(self, finished_reason: str, e2e_seconds: float) -> None:
        self.request_success.labels(model_name=self.model_name, finished_reason=finished_reason).inc()
        self.e2e_request_latency.observe(e2e_seconds)

    def on_aborted(self) -> None:
        self.num_aborted_requests.inc()

    def on_compressor_selected(self, primitive: str) -> None:
        self.compressor_selected.labels(model_name=self.model_name, primitive=primitive).inc()
