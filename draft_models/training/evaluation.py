"""Mean accepted length (MAL) of the draft under training, with the real speculative decoder.

Each held-out prompt (a conversation up to its first assistant turn) is decoded greedily
by `SpeculativeDecoder`, with the draft cast to the target's dtype as the server would
load it. MAL is committed tokens per step; the first token, which comes from the prefill,
is not a step. Committed tokens past an EOS or past `max_tokens` are not counted, as the
server does not return them. Per-position acceptance k is the fraction of steps that
accepted at least k draft tokens.

Every evaluation appends one JSON line to `<out>/metrics.jsonl` and redraws
`<out>/mal.png` (MAL against optimizer steps) from all lines of that file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from draft_models.eagle import EagleDraft
from draft_models.llama_layers import rope_inv_freq
from draft_models.training.data import Prompt
from server.engine.speculative import SpeculativeDecoder
from server.engine.types import SamplingParams

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "mal.png"


@dataclass
class AcceptanceStats:
    mal: float  # committed tokens per step; 0.0 when no step ran
    acceptance: list[float]  # [depth] fraction of steps with at least k accepted draft tokens
    num_steps: int
    num_tokens: int  # tokens generated, the prefill's first token included
    num_prompts: int


def servable_copy(draft: EagleDraft, target) -> EagleDraft:
    """Return a copy of the draft in the target's dtype, bound to the target's embedding and LM head."""
    copy = EagleDraft(draft.config)
    copy.load_state_dict(draft.state_dict())
    copy = copy.to(device=target.device, dtype=target.dtype).eval()
    copy.inv_freq = rope_inv_freq(draft.config.layer).to(target.device)  # rotary tables stay float32
    copy.bind_target(target.decoder.embed_tokens, target.decoder.lm_head)
    return copy


def measure_acceptance(
    target, draft: EagleDraft, prompts: list[Prompt], max_tokens: int, depth: int, top_k: int, total_tokens: int
) -> AcceptanceStats:
    """Decode every prompt greedily with the draft and count committed tokens per step."""
    if not prompts:
        return AcceptanceStats(0.0, [0.0] * depth, 0, 0, 0)
    longest = max(len(prompt.token_ids) for prompt in prompts)
    decoder = SpeculativeDecoder(target, servable_copy(draft, target), 1, longest + max_tokens, depth, top_k, total_tokens)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    eos = target.eos_token_ids

    num_steps = committed_total = generated = 0
    at_least = [0] * depth
    for prompt in prompts:
        state = decoder.prefill(0, prompt.token_ids, prompt.pixel_values, params, None)
        produced = 1
        finished = state.root_token in eos
        while not finished and produced < max_tokens:
            result = decoder.step([state], [params], [None])[0]
            accepted = len(result.committed) - 1
            for k in range(min(accepted, depth)):
                at_least[k] += 1

            counted = 0  # committed tokens up to the first EOS or max_tokens
            for token in result.committed:
                counted += 1
                if token in eos:
                    finished = True
                    break
                if produced + counted >= max_tokens:
                    break
            num_steps += 1
            committed_total += counted
            produced += counted
        generated += produced

    mal = committed_total / num_steps if num_steps else 0.0
    acceptance = [count / num_steps if num_steps else 0.0 for count in at_least]
    return AcceptanceStats(mal, acceptance, num_steps, generated, len(prompts))


def append_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS_NAME, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def drop_metrics_after(out: Path, step: int) -> None:
    """Remove metric lines past `step`, left by a run that went on after the checkpoint being resumed."""
    records = read_metrics(out)
    kept = [record for record in records if record["step"] <= step]
    if len(kept) != len(records):
        (out / METRICS_NAME).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_mal(out: Path) -> bool:
    """Draw MAL against steps from metrics.jsonl into mal.png; return False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        logger.warning("matplotlib is not installed, so %s is not drawn; install specvlm[train]", PLOT_NAME)
        return False
    records = read_metrics(out)
    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.plot([r["step"] for r in records], [r["mal"] for r in records], marker="o")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean accepted length (tokens / step)")
    axes.set_title("Draft MAL on the held-out set (greedy)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / PLOT_NAME, dpi=100)
    pyplot.close(figure)
    return True


def evaluate_and_record(out: Path, target, draft: EagleDraft, prompts: list[Prompt], config, extra: dict) -> AcceptanceStats:
    """Measure MAL, append the metrics line, redraw the plot and return the numbers.

    `config` is the run's `TrainingConfig`; `extra` (step, training loss, ...) goes into the line.
    """
    was_training = draft.training
    with torch.random.fork_rng(devices=[target.device] if target.device.type == "cuda" else []):
        stats = measure_acceptance(
            target, draft, prompts, config.eval_max_tokens, config.tree_depth, config.tree_top_k, config.tree_total_tokens
        )
    draft.train(was_training)
    record = {
        **extra,
        "mal": stats.mal,
        "acceptance": stats.acceptance,
        "eval_prompts": stats.num_prompts,
        "eval_steps": stats.num_steps,
        "eval_tokens": stats.num_tokens,
    }
    append_metrics(out, record)
    plot_mal(out)
    logger.info(
        "step %d: MAL %.3f over %d prompts (%d steps); acceptance by position %s",
        extra.get("step", -1), stats.mal, stats.num_prompts, stats.num_steps,
        " ".join(f"{value:.2f}" for value in stats.acceptance),
    )
    return stats
