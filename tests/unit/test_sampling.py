"""Tree acceptance: greedy picks the longest matching path; sampling keeps the target's distribution."""

import collections

import torch

from server.engine.sampling import accept_greedy, accept_sampled, target_probs
from server.engine.tree import DraftTree, ancestor_mask
from server.engine.types import SamplingParams

VOCAB = 8
# 99.9th percentile of the chi-square distribution with 7 degrees of freedom.
CHI2_7DOF_999 = 24.32


def _tree(tokens, parents) -> DraftTree:
    parents_t = torch.tensor([parents])
    depths = [0] * len(parents)
    for node, parent in enumerate(parents):
        depths[node] = 0 if parent < 0 else depths[parent] + 1
    return DraftTree(torch.tensor([tokens]), parents_t, torch.tensor([depths]), ancestor_mask(parents_t, max(depths)))


def test_ancestor_mask_worked_example():
    mask = _tree([0, 5, 6, 7], [-1, 0, 0, 1]).ancestors[0].int().tolist()
    assert mask == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]


def test_greedy_takes_longest_matching_path():
    tree = _tree([0, 5, 6, 7, 2], [-1, 0, 0, 1, 3])  # paths: 5-7-2 and 6
    logits = torch.full((1, 5, VOCAB), -5.0)
    logits[0, 0, 5] = 1  # after the root the target wants 5 ...
    logits[0, 1, 7] = 1  # ... then 7 ...
    logits[0, 3, 3] = 1  # ... then 3, not the drafted 2
    result = accept_greedy(tree, logits)[0]
    assert result.path == [0, 1, 3]
    assert result.bonus_token == 3


def test_greedy_rejects_all():
    tree = _tree([0, 5, 6], [-1, 0, 0])
    logits = torch.zeros(1, 3, VOCAB)
    logits[0, 0, 4] = 1
    result = accept_greedy(tree, logits)[0]
    assert result.path == [0]
    assert result.bonus_token == 4


def _chi_square(counts: collections.Counter, probs: torch.Tensor, total: int) -> float:
    expected = probs * total
    observed = torch.tensor([counts.get(token, 0) for token in range(VOCAB)], dtype=torch.float)
    keep = expected > 0
    return float((((observed - expected) ** 2)[keep] / expected[keep]).sum())


def test_sampled_acceptance_preserves_distribution():
    torch.manual_seed(0)
    params = SamplingParams(max_tokens=4, temperature=0.8)
    logits = torch.randn(4, VOCAB) * 1.5
    probs = target_probs(logits, params)
    # Root with children 3, 1, 5; node 1 (token 3) has children 0 and 6.
    tokens, parents = [0, 3, 1, 5, 0, 6], [-1, 0, 0, 0, 1, 1]
    node_probs = torch.stack([probs[0], probs[1], probs[2], probs[3], probs[0], probs[0]])
    generator = torch.Generator().manual_seed(1)
    first, second_after_3 = collections.Counter(), collections.Counter()
    trials = 20000
    for _ in range(trials):
        result = accept_sampled(tokens, parents, node_probs, generator)
        emitted = [tokens[n] for n in result.path[1:]] + [result.bonus_token]
        first[emitted[0]] += 1
        if emitted[0] == 3:
            second_after_3[emitted[1]] += 1
    assert _chi_square(first, probs[0], trials) < CHI2_7DOF_999
    assert _chi_square(second_after_3, probs[1], sum(second_after_3.values())) < CHI2_7DOF_999


def test_top_k_and_top_p_filter():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    top_k = target_probs(logits, SamplingParams(max_tokens=1, temperature=1.0, top_k=2))
    assert (top_k[2:] == 0).all()
    assert abs(float(top_k.sum()) - 1) < 1e-6
    top_p = target_probs(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5))
    assert top_p[0] == 1.0
