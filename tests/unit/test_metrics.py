"""Metrics tests: call the recording methods, parse the exposition, check the values."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics

MODEL = "demo-vlm"


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Parse the registry's text exposition into {(sample name, labels): value}."""
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset({"model_name": MODEL, **labels}.items()))]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(MODEL)


def test_every_series_has_prefix_and_model_label(metrics: Metrics) -> None:
    metrics.on_spec_step(4, [1, 0])
    metrics.on_compressor_selected("pool")

    for name, labels in samples(metrics):
        assert name.startswith("specvlm_")
        assert ("model_name", MODEL) in labels


def test_series_names_match_design(metrics: Metrics) -> None:
    metrics.on_spec_step(4, [1])
    metrics.on_compressor_selected("prune")
    names = {name for name, _ in samples(metrics)}

    expected = {
        "specvlm_num_requests_running",
        "specvlm_num_requests_waiting",
        "specvlm_kv_cache_usage_perc",
        "specvlm_request_success_total",
        "specvlm_num_aborted_requests_total",
        "specvlm_prompt_tokens_total",
        "specvlm_generation_tokens_total",
        "specvlm_visual_tokens_total",
        "specvlm_time_to_first_token_seconds_count",
        "specvlm_inter_token_latency_seconds_count",
        "specvlm_e2e_request_latency_seconds_count",
        "specvlm_request_queue_time_seconds_count",
        "specvlm_spec_decode_num_drafts_total",
        "specvlm_spec_decode_num_draft_tokens_total",
        "specvlm_spec_decode_num_accepted_tokens_total",
        "specvlm_spec_decode_num_accepted_tokens_per_pos_total",
        "specvlm_compressor_selected_total",
    }
    assert expected <= names


def test_gauges(metrics: Metrics) -> None:
    metrics.set_queue(running=3, waiting=7)
    metrics.set_kv_cache_usage(0.25)

    assert value(metrics, "specvlm_num_requests_running") == 3
    assert value(metrics, "specvlm_num_requests_waiting") == 7
    assert value(metrics, "specvlm_kv_cache_usage_perc") == 0.25


def test_on_admitted(metrics: Metrics) -> None:
    metrics.on_admitted(prompt_tokens=700, target_visual_tokens=576, draft_visual_tokens=144, queue_seconds=0.2)
    metrics.on_admitted(prompt_tokens=30, target_visual_tokens=0, draft_visual_tokens=0, queue_seconds=0.0)

    assert value(metrics, "specvlm_prompt_tokens_total") == 730
    assert value(metrics, "specvlm_visual_tokens_total", model="target") == 576
    assert value(metrics, "specvlm_visual_tokens_total", model="draft") == 144
    assert value(metrics, "specvlm_request_queue_time_seconds_count") == 2
    assert value(metrics, "specvlm_request_queue_time_seconds_sum") == pytest.approx(0.2)


def test_on_first_token(metrics: Metrics) -> None:
    metrics.on_first_token(0.3)

    assert value(metrics, "specvlm_time_to_first_token_seconds_count") == 1
    assert value(metrics, "specvlm_time_to_first_token_seconds_sum") == pytest.approx(0.3)
    assert value(metrics, "specvlm_time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(metrics, "specvlm_time_to_first_token_seconds_bucket", le="0.5") == 1


def test_on_tokens_splits_interval(metrics: Metrics) -> None:
    metrics.on_tokens(1, 0.0)  # first token: no inter-token latency
    metrics.on_tokens(4, 0.2)  # one step committing 4 tokens

    assert value(metrics, "specvlm_generation_tokens_total") == 5
    assert value(metrics, "specvlm_inter_token_latency_seconds_count") == 4
    assert value(metrics, "specvlm_inter_token_latency_seconds_sum") == pytest.approx(0.2)
    assert value(metrics, "specvlm_inter_token_latency_seconds_bucket", le="0.03") == 0
    assert value(metrics, "specvlm_inter_token_latency_seconds_bucket", le="0.05") == 4


def test_on_spec_step(metrics: Metrics) -> None:
    metrics.on_spec_step(num_draft_tokens=15, accepted_per_position=[1, 1, 0])
    metrics.on_spec_step(num_draft_tokens=15, accepted_per_position=[1, 0, 0])

    assert value(metrics, "specvlm_spec_decode_num_drafts_total") == 2
    assert value(metrics, "specvlm_spec_decode_num_draft_tokens_total") == 30
    assert value(metrics, "specvlm_spec_decode_num_accepted_tokens_total") == 3
    per_position = "specvlm_spec_decode_num_accepted_tokens_per_pos_total"
    assert value(metrics, per_position, position="0") == 2
    assert value(metrics, per_position, position="1") == 1
    assert value(metrics, per_position, position="2") == 0
    mean_accepted_length = 1 + 3 / 2
    assert mean_accepted_length == 2.5


def test_on_finished_and_aborted(metrics: Metrics) -> None:
    metrics.on_finished("stop", 1.5)
    metrics.on_finished("stop", 0.5)
    metrics.on_finished("length", 2.0)
    metrics.on_aborted()

    assert value(metrics, "specvlm_request_success_total", finished_reason="stop") == 2
    assert value(metrics, "specvlm_request_success_total", finished_reason="length") == 1
    # An abort is not a success: it shows only in the aborted counter.
    reasons = {dict(labels).get("finished_reason") for name, labels in samples(metrics) if name == "specvlm_request_success_total"}
    assert "abort" not in reasons
    assert value(metrics, "specvlm_e2e_request_latency_seconds_count") == 3
    assert value(metrics, "specvlm_e2e_request_latency_seconds_sum") == pytest.approx(4.0)
    assert value(metrics, "specvlm_num_aborted_requests_total") == 1


def test_on_compressor_selected(metrics: Metrics) -> None:
    metrics.on_compressor_selected("pool")
    metrics.on_compressor_selected("pool")
    metrics.on_compressor_selected("prune")

    assert value(metrics, "specvlm_compressor_selected_total", primitive="pool") == 2
    assert value(metrics, "specvlm_compressor_selected_total", primitive="prune") == 1


def test_separate_registries_do_not_share_values() -> None:
    first = Metrics(MODEL)
    second = Metrics(MODEL)
    first.on_tokens(5, 0.0)

    assert value(first, "specvlm_generation_tokens_total") == 5
    assert value(second, "specvlm_generation_tokens_total") == 0


def test_given_registry_is_used() -> None:
    registry = CollectorRegistry()

    metrics = Metrics(MODEL, registry=registry)

    assert metrics.registry is registry
    assert registry.get_sample_value("specvlm_generation_tokens_total", {"model_name": MODEL}) == 0


def test_counters_exact_under_threads(metrics: Metrics) -> None:
    def record() -> None:
        for _ in range(1000):
            metrics.on_tokens(2, 0.01)
            metrics.on_spec_step(3, [1, 0])

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert value(metrics, "specvlm_generation_tokens_total") == 8000
    assert value(metrics, "specvlm_inter_token_latency_seconds_count") == 8000
    assert value(metrics, "specvlm_spec_decode_num_drafts_total") == 4000
    assert value(metrics, "specvlm_spec_decode_num_accepted_tokens_per_pos_total", position="0") == 4000
