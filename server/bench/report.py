"""Write benchmark results as JSON, a markdown table and a PNG chart, with machine and versions."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from server import __version__
from server.bench.systems import BASELINE

logger = logging.getLogger(__name__)

JSON_NAME, MARKDOWN_NAME, CHART_NAME = "results.json", "results.md", "chart.png"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment() -> dict:
    """Return the date, machine and software versions to store with every result."""
    import transformers

    machine = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(),
               "os": platform.platform()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["specvlm", *sys.argv[1:]]) if sys.argv else "specvlm bench",
        "machine": machine,
        "versions": {"specvlm": __version__, "git_commit": _git_commit(), "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _format(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _header(result: dict, title: str) -> list[str]:
    machine = result["machine"]
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    versions = ", ".join(f"{name} {value}" for name, value in result["versions"].items() if value)
    memory = f", {machine['memory_gib']:.0f} GiB" if machine.get("memory_gib") else ""
    return [
        f"## {title}",
        "",
        f"- date: {result['date']}",
        f"- machine: {machine['cpu']}, {machine['cpu_count']} logical CPUs{memory}{gpu} ({machine['os']})",
        f"- command: `{result['command']}`",
        f"- versions: {versions}",
        "",
    ]


def offline_markdown(result: dict) -> str:
    """Render the side-by-side table with its settings and definitions."""
    settings = result["settings"]
    lines = _header(result, "Side-by-side decoding speed")
    trees = ", ".join(f"{system['name']} {system['tree_total_tokens']}" for system in result["systems"]
                      if "tree_total_tokens" in system)
    lines += [
        f"{settings['num_prompts']} prompts ({settings['num_image_prompts']} with an image) from "
        f"`{settings['prompts_file']}`, {settings['max_tokens']} output tokens each (EOS ignored), "
        f"{settings['repeats']} repeats, device {settings['device']}, dtype {settings['dtype']}. "
        f"Tree size (nodes verified per step, 1 = drafting off): {trees}.",
        "",
        "| system | T | tokens/s median (min-max) | ratio to hf | MAL | TTFT median (s) | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:
        speed = row["tokens_per_second"]
        lines.append(
            f"| {row['system']} | {row['temperature']:g} | {speed['median']:.1f} ({speed['min']:.1f}-{speed['max']:.1f}) "
            f"| {_format(row['ratio_to_hf'])}x | {_format(row['mal'])} | {row['ttft_seconds']['median']:.3f} "
            f"| {row['peak_memory_mib']:.1f} |"
        )
    lines += [
        "",
        f"tokens/s: output tokens / seconds from the call to the last token, summed over the prompts of a repeat. "
        f"Ratio: tokens/s over `{BASELINE}` (Hugging Face `generate`) in the same repeat, median over repeats. "
        "MAL: committed tokens per target forward (1 + accepted / steps); for hf-prompt-lookup it is counted "
        "from the streamer calls of `generate`, its first forward included. "
        f"Peak memory: {result['memory_method']}.",
        "",
    ]
    return "\n".join(lines)


def load_markdown(result: dict) -> str:
    """Render the load sweep table."""
    settings = result["settings"]
    lines = _header(result, "Serving load")
    lines += [
        f"Server {settings['url']} (model `{result['served_model']}`), streaming chat completions, "
        f"max_tokens {settings['max_tokens']}, temperature {settings['temperature']:g}, at most "
        f"{settings['num_requests']} requests and {settings['max_seconds']:g} s per level, prompts from "
        f"`{settings['prompts_file']}`.",
        "",
        "| clients | completed / sent | errors | output tokens/s | TTFT p50 / p90 / p99 (ms) "
        "| ITL p50 / p90 / p99 (ms) | TPOT p50 (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in result["levels"]:
        errors = ", ".join(f"{kind} {count}" for kind, count in level["errors"].items()) or "0"
        lines.append(
            f"| {level['concurrency']} | {level['requests_completed']} / {level['requests_sent']} | {errors} "
            f"| {level['output_tokens_per_second']:.1f} | {_triple(level['ttft_ms'])} | {_triple(level['itl_ms'])} "
            f"| {_format(level['tpot_ms'] and level['tpot_ms']['p50'], 0)} |"
        )
    lines += [
        "",
        "TTFT: request sent to first content chunk. ITL: gap between consecutive content chunks (one chunk can "
        "carry several tokens of a speculative step). TPOT: (latency - TTFT) / (output tokens - 1) per request.",
        "",
    ]
    return "\n".join(lines)


def _triple(percentiles: dict | None) -> str:
    if percentiles is None:
        return "-"
    return " / ".join(f"{percentiles[key]:.0f}" for key in ("p50", "p90", "p99"))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the chart needs matplotlib; install it with pip install 'specvlm[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def offline_chart(result: dict, path: Path) -> None:
    """Draw median tokens/s per system with min-max error bars, one panel per temperature."""
    plt = _pyplot()
    temperatures = list(dict.fromkeys(row["temperature"] for row in result["results"]))
    figure, axes = plt.subplots(1, len(temperatures), figsize=(5 * len(temperatures), 4), squeeze=False)
    for axis, temperature in zip(axes[0], temperatures):
        rows = [row for row in result["results"] if row["temperature"] == temperature]
        medians = [row["tokens_per_second"]["median"] for row in rows]
        errors = [[m - row["tokens_per_second"]["min"] for m, row in zip(medians, rows)],
                  [row["tokens_per_second"]["max"] - m for m, row in zip(medians, rows)]]
        positions = range(len(rows))
        axis.bar(positions, medians, yerr=errors, capsize=3, color="tab:blue")
        for position, row in zip(positions, rows):
            top = row["tokens_per_second"]["max"]
            axis.annotate(f"{_format(row['ratio_to_hf'])}x", (position, top), ha="center", va="bottom",
                          xytext=(0, 4), textcoords="offset points", fontsize=8)
        axis.set_xticks(list(positions), [row["system"] for row in rows], rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("output tokens/s (median, min-max)")
        axis.set_title(f"temperature {temperature:g}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def load_chart(result: dict, path: Path) -> None:
    """Draw throughput and TTFT p50 against the number of concurrent clients."""
    plt = _pyplot()
    levels = result["levels"]
    clients = [level["concurrency"] for level in levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [level["output_tokens_per_second"] for level in levels], marker="o")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("output tokens/s, all clients")
    left.set_xscale("log", base=2)
    for key, label in (("ttft_ms", "TTFT p50"), ("itl_ms", "ITL p50")):
        values = [level[key]["p50"] if level[key] else float("nan") for level in levels]
        right.plot(clients, values, marker="o", label=label)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("ms")
    right.set_xscale("log", base=2)
    right.legend()
    for axis in (left, right):
        axis.set_xticks(clients, [str(count) for count in clients])
        axis.minorticks_off()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(result: dict, out: Path) -> list[Path]:
    """Write results.json, results.md and chart.png into `out`; return the paths written.

    Without matplotlib the chart is skipped with a warning, so a long run still keeps
    its JSON and markdown.
    """
    out.mkdir(parents=True, exist_ok=True)
    offline = result["kind"] == "offline"
    paths = [out / JSON_NAME, out / MARKDOWN_NAME]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(offline_markdown(result) if offline else load_markdown(result))
    try:
        (offline_chart if offline else load_chart)(result, out / CHART_NAME)
    except RuntimeError as error:
        logger.warning("skipped %s: %s", out / CHART_NAME, error)
        return paths
    return [*paths, out / CHART_NAME]
