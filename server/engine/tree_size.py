"""Choose the draft tree size for this device and draft at start-up.

A bigger tree accepts more tokens per step but makes the verify forward dearer. How much
dearer depends on the device. On a 2-core CPU, a 16-token verify of the demo model cost
about 3 times a 1-token one. A GPU at these sizes is expected to be far from
compute-bound, so there the cost should grow much more slowly (not measured here).
EAGLE-2's observation gives the gain side: if the draft is calibrated, the expected
number of accepted tokens of a tree is the sum over its nodes of the draft probability
of the node's path. So this module
1. times target verify forwards of 1, 2, 4, ... tokens on this device,
2. runs a few real draft trees at the largest size on a fixed prompt and, for each
   candidate size T, sums the path probabilities of the best T - 1 nodes,
3. picks the T that maximises (1 + expected accepted) / (draft time + verify time(T)).
The estimate trusts the draft's confidence; a badly calibrated draft gets a wrong size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from draft_models.llama_layers import AttentionMask
from server.engine.speculative import SpeculativeDecoder
from server.engine.tree import build_draft_tree
from server.engine.types import SamplingParams

logger = logging.getLogger(__name__)

CALIBRATION_PROMPT = (
    "Explain in a few sentences why the sky is blue, then list three other everyday things "
    "that light scattering explains."
)


@dataclass
class TreeSizeChoice:
    total_tokens: int
    expected_tokens_per_second: float
    table: list[tuple[int, float, float, float]]  # (size, verify seconds, expected committed, tokens/s)


def _time_call(function, repeats: int) -> float:
    """Return the fastest of `repeats` timed calls, the estimate least disturbed by other load."""
    function()  # warm-up
    fastest = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


@torch.inference_mode()
def verify_seconds(decoder: SpeculativeDecoder, sizes: list[int], context: int = 256, repeats: int = 5) -> dict[int, float]:
    """Time one target forward over `size` tree tokens after `context` cached positions, on slot 0."""
    target = decoder.target
    device = decoder.device
    slot = torch.tensor([0], device=device)
    result = {}
    for size in sizes:
        start = torch.tensor([min(context, decoder.capacity - size)], device=device)
        tokens = torch.zeros(1, size, dtype=torch.long, device=device)
        mask = AttentionMask.build(slot, start, start, AttentionMask.causal(size, device)[None])
        positions = start + torch.arange(size, device=device)[None]

        def forward():
            features = target.decoder(target.decoder.embed_tokens(tokens), positions, decoder.target_cache, mask)
            return target.decoder.logits(features)

        result[size] = _time_call(forward, repeats)
    return result


@torch.inference_mode()
def choose_tree_size(decoder: SpeculativeDecoder, token_ids: list[int], max_tokens: int = 64,
                     calibration_steps: int = 12) -> TreeSizeChoice:
    """Measure this device and draft and return the best `total_tokens` (1 means no drafting)."""
    largest = min(max_tokens, decoder.max_tree_tokens)
    sizes = [size for size in (1, 2, 4, 8, 16, 32, 64, 128) if size < largest] + [largest]
    verify = verify_seconds(decoder, sizes)

    greedy = SamplingParams(max_tokens=calibration_steps * 8, temperature=0.0)
    state = decoder.prefill(0, torch.tensor(token_ids), None, greedy, None)
    path_mass = {size: 0.0 for size in sizes}
    draft_seconds = 0.0
    for _ in range(calibration_steps):
        slots = torch.tensor([state.slot], device=decoder.device)
        cache_len = torch.tensor([state.cache_len], device=decoder.device)
        start = time.perf_counter()
        tree = build_draft_tree(
            decoder.draft, decoder.draft_cache, slots, cache_len, torch.tensor([state.root_token], device=decoder.device),
            state.root_hidden[None], decoder.depth, decoder.top_k, max(sizes),
        )
        draft_seconds += time.perf_counter() - start
        ranked = tree.scores[0, 1:].exp().sort(descending=True).values.cpu()
        for size in sizes:
            path_mass[size] += float(ranked[: size - 1].sum())
        decoder.step([state], [greedy], [None])  # advance with the configured tree, for the next context
    draft_seconds /= calibration_steps

    table = []
    for size in sizes:
        committed = 1 + path_mass[size] / calibration_steps
        seconds = verify[size] + (draft_seconds if size > 1 else 0.0)
        table.append((size, verify[size], committed, committed / seconds))
    best = max(table, key=lambda row: row[3])
    return TreeSizeChoice(total_tokens=best[0], expected_tokens_per_second=best[3], table=table)
