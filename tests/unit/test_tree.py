"""EAGLE-2 tree construction on hand-made draft distributions."""

import math

import torch

from draft_models.llama_layers import KVCache
from server.engine.tree import build_draft_tree

VOCAB = 10
ROOT, A, B, C, D, E, F = range(7)


class TableDraft(torch.nn.Module):
    """A draft whose next-token distribution depends only on the input token, from a table."""

    def __init__(self, table: dict[int, dict[int, float]]):
        super().__init__()
        self.log_probs = torch.full((VOCAB, VOCAB), -30.0)
        for token, children in table.items():
            rest = 1.0 - sum(children.values())
            self.log_probs[token] = math.log(rest / (VOCAB - len(children)))  # spread below every child
            for child, probability in children.items():
                self.log_probs[token, child] = math.log(probability)
        self.embed_tokens = torch.nn.Embedding.from_pretrained(torch.eye(VOCAB))

    def forward(self, input_embeds, features, positions, cache, mask):
        return input_embeds.argmax(-1, keepdim=True).float()  # the output carries the input token

    def next_feature(self, output):
        return output

    def logits(self, output):
        return self.log_probs[output[..., 0].long()]


def _build(draft, depth, top_k, total_tokens):
    cache = KVCache(1, 1, 1, 64, 1, torch.float32, "cpu")
    root_output = torch.tensor([[float(ROOT)]])
    return build_draft_tree(
        draft, cache, torch.tensor([0]), torch.tensor([5]), torch.tensor([ROOT]), root_output,
        depth=depth, top_k=top_k, total_tokens=total_tokens,
    )


def test_worked_example_tree():
    table = {
        ROOT: {A: math.exp(-0.2), B: math.exp(-1.9)},
        A: {C: math.exp(-0.1), D: math.exp(-2.5)},
        B: {E: math.exp(-0.2), F: math.exp(-1.8)},
    }
    tree = _build(TableDraft(table), depth=2, top_k=2, total_tokens=4)
    assert tree.tokens[0].tolist() == [ROOT, A, B, C]
    assert tree.parents[0].tolist() == [-1, 0, 0, 1]
    assert tree.depths[0].tolist() == [0, 1, 1, 2]
    assert tree.ancestors[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert tree.paths(0) == [[0, 2, -1], [0, 1, 3]]


def test_confident_chain_goes_deep():
    """A confident draft spends the budget on depth: the tree becomes one long chain."""
    table = {ROOT: {A: 0.97}, A: {B: 0.97}, B: {C: 0.97}, C: {D: 0.97}}
    tree = _build(TableDraft(table), depth=4, top_k=2, total_tokens=5)
    assert tree.tokens[0].tolist() == [ROOT, A, B, C, D]
    assert tree.depths[0].tolist() == [0, 1, 2, 3, 4]
    assert tree.paths(0) == [[0, 1, 2, 3, 4]]


def test_unsure_draft_goes_wide():
    """An unsure draft spends the budget on siblings at the first level."""
    table = {ROOT: {A: 0.3, B: 0.3, C: 0.3}, A: {D: 0.2}, B: {E: 0.2}, C: {F: 0.2}}
    tree = _build(TableDraft(table), depth=2, top_k=3, total_tokens=4)
    assert sorted(tree.tokens[0, 1:].tolist()) == [A, B, C]
    assert tree.depths[0].tolist() == [0, 1, 1, 1]
    assert len(tree.paths(0)) == 3


def test_tree_is_connected():
    torch.manual_seed(0)
    table = {token: {child: 0.05 + 0.1 * ((token + child) % 3) for child in range(VOCAB) if child != token}
             for token in range(VOCAB)}
    for token in table:  # normalise each row to a distribution
        total = sum(table[token].values())
        table[token] = {child: p / total * 0.99 for child, p in table[token].items()}
    tree = _build(TableDraft(table), depth=4, top_k=3, total_tokens=12)
    parents = tree.parents[0].tolist()
    for node, parent in enumerate(parents[1:], start=1):
        assert 0 <= parent < node
        assert tree.depths[0, node] == tree.depths[0, parent] + 1
