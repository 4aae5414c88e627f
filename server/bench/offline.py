"""The side-by-side run: every system on the same prompts, interleaved request by request.

All systems are loaded first. Then each repeat runs, for each temperature and prompt,
one request on every system, starting the rotation at a different system each time.
So slow drift of the machine (other jobs, thermal limits) hits every system alike, and
no system always runs right after the same neighbour.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from server.bench.memory import PeakGrowth, memory_method
from server.bench.prompts import BenchPrompt
from server.bench.systems import BASELINE, EngineSystem, HFSystem, RunResult, SystemSpec
from server.config import ServerConfig
from server.engine.loading import resolve_paths
from server.engine.target import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

WARMUP_TOKENS = 8
MIB = 2**20


@dataclass
class OfflineSettings:
    max_tokens: int
    repeats: int
    temperatures: list[float]
    seed: int = 0
    warmup: bool = True


@dataclass
class _Record:
    """Every run of one system at one temperature, grouped by repeat."""

    runs_by_repeat: dict[int, list[RunResult]] = field(default_factory=dict)
    growth_bytes: list[int] = field(default_factory=list)


def load_systems(specs: list[SystemSpec], config: ServerConfig) -> list:
    """Load every system; drop the draft systems when there is no draft, with a warning."""
    target_path, draft_path, _ = resolve_paths(config)
    if draft_path is None and any(spec.needs_draft for spec in specs):
        logger.warning("no draft checkpoint (--draft), so the draft systems are skipped")
        specs = [spec for spec in specs if not spec.needs_draft]
    if not any(spec.kind == "engine" for spec in specs):
        raise ValueError("no specvlm system selected; add plain or draft to --systems")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)

    systems = []
    hf_model = None
    for spec in specs:
        logger.info("loading system %s", spec.name)
        if spec.kind == "hf":
            if hf_model is None:
                hf_model = HFSystem.load_model(target_path, device, dtype)
            systems.append(HFSystem(spec, hf_model, device, dtype))
        else:
            systems.append(EngineSystem(spec, config))
    return systems


def run_offline(systems: list, prompts: list[BenchPrompt], settings: OfflineSettings,
                progress: bool = True) -> dict:
    """Run the interleaved benchmark and return the systems and per-temperature results."""
    engine_system = next(system for system in systems if isinstance(system, EngineSystem))
    prepared = [engine_system.prepare(prompt.messages) for prompt in prompts]
    device = engine_system.device

    if settings.warmup:
        for system in tqdm(systems, desc="warm-up", disable=not progress):
            for temperature in settings.temperatures:
                system.generate(prepared[0], min(WARMUP_TOKENS, settings.max_tokens), temperature, settings.seed)

    records = {(system.spec.name, t): _Record() for system in systems for t in settings.temperatures}
    total = settings.repeats * len(settings.temperatures) * len(prepared) * len(systems)
    with tqdm(total=total, desc="bench", unit="request", disable=not progress) as bar:
        for repeat in range(settings.repeats):
            for temperature in settings.temperatures:
                for index, prompt in enumerate(prepared):
                    seed = settings.seed + 1000 * repeat + index
                    shift = (repeat + index) % len(systems)
                    for system in systems[shift:] + systems[:shift]:
                        bar.set_postfix_str(f"{system.spec.name} T={temperature:g}")
                        with PeakGrowth(device) as memory:
                            result = system.generate(prompt, settings.max_tokens, temperature, seed)
                        record = records[(system.spec.name, temperature)]
                        record.runs_by_repeat.setdefault(repeat, []).append(result)
                        if memory.growth_bytes is not None:
                            record.growth_bytes.append(memory.growth_bytes)
                        bar.update()

    return {
        "memory_method": memory_method(device),
        "systems": [_describe_system(system) for system in systems],
        "results": _summarize(systems, records, settings.temperatures),
    }


def _describe_system(system) -> dict:
    description = {"name": system.spec.name, "kind": system.spec.kind, "settings": system.spec.settings,
                   "model_memory_mib": system.model_bytes() / MIB}
    if isinstance(system, EngineSystem):
        description["tree_total_tokens"] = system.tree_total_tokens
    return description


def _tokens_per_second(runs: list[RunResult]) -> float:
    return sum(run.output_tokens for run in runs) / sum(run.seconds for run in runs)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _summarize(systems: list, records: dict, temperatures: list[float]) -> list[dict]:
    rows = []
    for temperature in temperatures:
        baseline = records[(BASELINE, temperature)].runs_by_repeat if (BASELINE, temperature) in records else None
        for system in systems:
            record = records[(system.spec.name, temperature)]
            rates = [_tokens_per_second(runs) for _, runs in sorted(record.runs_by_repeat.items())]
            runs = [run for repeat_runs in record.runs_by_repeat.values() for run in repeat_runs]
            ratio = None
            if baseline:
                # Ratio within each repeat, then the median: pairs runs made close in time.
                ratio = statistics.median(
                    _tokens_per_second(record.runs_by_repeat[repeat]) / _tokens_per_second(baseline[repeat])
                    for repeat in sorted(record.runs_by_repeat)
                )
            steps = [run.steps for run in runs if run.steps is not None]
            accepted = [run.accepted_tokens for run in runs if run.accepted_tokens is not None]
            # A system that does not speculate commits one token per target forward.
            mal = 1 + sum(accepted) / sum(steps) if sum(steps) else 1.0
            ttfts = [run.ttft_seconds for run in runs]
            growth = max(record.growth_bytes) / MIB if record.growth_bytes else None
            model_mib = system.model_bytes() / MIB
            rows.append({
                "system": system.spec.name,
                "temperature": temperature,
                "tokens_per_second": {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                                      "runs": rates},
                "ratio_to_hf": ratio,
                "mal": mal,
                "ttft_seconds": {"median": statistics.median(ttfts), "p90": _percentile(ttfts, 0.9)},
                "model_memory_mib": model_mib,
                "run_memory_growth_mib": growth,
                "peak_memory_mib": model_mib + (growth or 0.0),
                "output_tokens_per_request": statistics.mean(run.output_tokens for run in runs),
                "requests": len(runs),
            })
    return rows


def close_systems(systems: list) -> None:
    for system in systems:
        system.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
