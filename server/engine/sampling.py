"""Verification of a draft tree against the target's logits: greedy and lossless sampling.

Greedy (temperature 0): a node is accepted when its token equals the target's argmax at
its parent. The longest accepted path wins, and the target's argmax after it is the
bonus token. The result equals the target's own greedy decoding.

Sampling (temperature > 0): at the current node, the children are tried one at a time in
node order. Child x is accepted with probability p(x), where p is the target's processed
distribution; on rejection p(x) is set to 0 and p renormalised. When every child is
rejected, the bonus token is sampled from what is left of p. Each child is a point-mass
proposal (the tree is chosen deterministically), so this samples exactly from p; it is
the rule EAGLE's code uses with draft probability 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.tree import DraftTree
from server.engine.types import SamplingParams


@dataclass
class Acceptance:
    """Result of verifying one tree."""

    path: list[int]  # node indices from the root (0) to the last accepted node
    bonus_token: int

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to logits [..., vocab] and return probabilities."""
    scaled = logits.float() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        threshold = scaled.topk(params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)  # always keeps the first
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> list[Acceptance]:
    """Verify every tree of the batch greedily; logits are [batch, num_nodes, vocab]."""
    predicted = logits.argmax(dim=-1)  # [batch, num_nodes]
    parents = tree.parents.clamp(min=0)
    matches = tree.tokens == predicted.gather(1, parents)
    matches[:, 0] = True
    accepted = matches.clone()
    for _ in range(int(tree.depths.max())):
        accepted = matches & accepted.gather(1, parents)
    best = (accepted * (tree.depths + 1)).argmax(dim=1)  # deepest accepted node
    results = []
    for row in range(tree.tokens.shape[0]):
        node = int(best[row])
        path = torch.nonzero(tree.ancestors[row, node]).flatten().tolist()
        results.append(Acceptance(path=path, bonus_token=int(predicted[row, node])))
    return results


def accept_sampled(
    tree_tokens: list[int],
    tree_parents: list[int],
    probs: torch.Tensor,  # [num_nodes, vocab] processed target distribution at each node
    generator: torch.Generator | None,
) -> Acceptance:
    """Verify one tree by the lossless sequential rule in the module docstring."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(tree_parents):
        if parent >= 0:
            children.setdefault(parent, []).append(node)
    node, path = 0, [0]
    while True:
        residual = probs[node].clone()
        chosen = None
        for child in children.get(node, []):
            token = tree_tokens[child]
            chance = float(residual[token])
            if chance > 0 and float(torch.rand((), generator=generator)) < chance:
                chosen = child
                break
            residual[token] = 0.0
            total = float(residual.sum())
            if total <= 0:  # only reachable through rounding: the rejected tokens held all mass
                residual = probs[node].clone()
                break
            residual /= total
        if chosen is None:
            return Acceptance(path=path, bonus_token=sample_token(residual, generator))
        node = chosen
        path.append(node)
