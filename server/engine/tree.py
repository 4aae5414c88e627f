"""EAGLE-2 dynamic draft tree: expand by confidence, then keep the best nodes.

Worked example with top_k = 2, depth = 2, total_tokens = 4 (root + 3 nodes). Level 1
takes the root's two likeliest tokens, A (log-prob -0.2) and B (-1.9). Expanding both
gives four candidates: AC (-0.2 - 0.1 = -0.3), AD (-2.7), BE (-2.1), BF (-3.7).
Reranking keeps the 3 best by path score: A (-0.2), AC (-0.3), B (-1.9). The nodes,
stored parent before child:

    index   0     1   2   3
    token   root  A   B   C
    parent  -1    0   0   1
    depth   0     1   1   2

the ancestor mask (row i attends to column j when j is i or an ancestor of i):

    root  1 0 0 0
    A     1 1 0 0
    B     1 0 1 0
    C     1 1 0 1

and the root-to-leaf paths, padded with -1: [0, 1, 3] (root, A, C) and [0, 2, -1] (root, B).

A child's score never exceeds its parent's (log-probabilities are <= 0) and ties keep
the parent first, so the kept set is always connected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from draft_models.eagle import EagleDraft
from draft_models.llama_layers import AttentionMask, KVCache


@dataclass
class DraftTree:
    """Draft trees of a batch, all with the same node count."""

    tokens: torch.Tensor  # [batch, num_nodes]; node 0 is the root (last committed token)
    parents: torch.Tensor  # [batch, num_nodes]; -1 for the root
    depths: torch.Tensor  # [batch, num_nodes]; 0 for the root
    ancestors: torch.Tensor  # [batch, num_nodes, num_nodes] bool; a node attends to itself and its ancestors
    scores: torch.Tensor | None = None  # [batch, num_nodes] path log-probability under the draft; root 0

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def paths(self, row: int) -> list[list[int]]:
        """Return the root-to-leaf node paths of one tree, leaves in node order, padded with -1."""
        parents = self.parents[row].tolist()
        has_child = set(parents)
        leaves = [node for node in range(len(parents)) if node not in has_child]
        width = int(self.depths[row].max()) + 1
        paths = []
        for leaf in leaves:
            path = torch.nonzero(self.ancestors[row, leaf]).flatten().tolist()
            paths.append(path + [-1] * (width - len(path)))
        return paths


def root_only_tree(root_tokens: torch.Tensor) -> DraftTree:
    """Return trees holding just the root: one target token per step, no speculation."""
    batch = root_tokens.shape[0]
    device = root_tokens.device
    return DraftTree(
        tokens=root_tokens[:, None],
        parents=torch.full((batch, 1), -1, dtype=torch.long, device=device),
        depths=torch.zeros(batch, 1, dtype=torch.long, device=device),
        ancestors=torch.ones(batch, 1, 1, dtype=torch.bool, device=device),
    )


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Return [batch, n, n] bool: row i is True at i and at every ancestor of i."""
    batch, count = parents.shape
    eye = torch.eye(count, device=parents.device).expand(batch, count, count)
    step = torch.zeros(batch, count, count, device=parents.device)
    has_parent = parents >= 0
    step[has_parent] = F.one_hot(parents[has_parent], count).float()
    reach, current = eye.clone(), eye
    for _ in range(max_depth):
        current = torch.bmm(current, step)
        reach = reach + current
    return reach > 0


@torch.inference_mode()
def build_draft_tree(
    draft: EagleDraft,
    cache: KVCache,
    slots: torch.Tensor,  # [batch]
    cache_len: torch.Tensor,  # [batch] committed draft positions; the root sits at cache_len
    root_tokens: torch.Tensor,  # [batch]
    root_hidden: torch.Tensor,  # [batch, draft output size] draft output at the position before the root
    depth: int,
    top_k: int,
    total_tokens: int,
) -> DraftTree:
    """Grow one EAGLE-2 tree per batch row; the draft's tree KV entries are scratch."""
    batch = root_tokens.shape[0]
    device = root_tokens.device
    k = top_k
    log_probs = torch.log_softmax(draft.logits(root_hidden), dim=-1)  # [batch, vocab]
    frontier_scores, frontier_tokens = log_probs.topk(k, dim=-1)  # [batch, k]
    frontier_ids = torch.arange(k, device=device).expand(batch, k)  # candidate index of each frontier node
    frontier_inputs = draft.next_feature(root_hidden)[:, None].expand(batch, k, -1)  # feature paired with each token
    visible = torch.eye(k, dtype=torch.bool, device=device).expand(batch, k, k)  # over the scratch region

    candidate_tokens, candidate_scores = [frontier_tokens], [frontier_scores]
    candidate_parents = [torch.full((batch, k), -1, dtype=torch.long, device=device)]
    candidate_depths = [torch.ones(batch, k, dtype=torch.long, device=device)]
    num_candidates = k
    for level in range(1, depth):
        mask = AttentionMask.build(slots, cache_len + (level - 1) * k, cache_len, visible)
        positions = (cache_len + level - 1)[:, None].expand(batch, k)
        hidden = draft(draft.embed_tokens(frontier_tokens), frontier_inputs, positions, cache, mask)
        child_scores, child_tokens = torch.log_softmax(draft.logits(hidden), dim=-1).topk(k, dim=-1)
        child_scores = (frontier_scores[:, :, None] + child_scores).reshape(batch, k * k)
        child_tokens = child_tokens.reshape(batch, k * k)
        candidate_tokens.append(child_tokens)
        candidate_scores.append(child_scores)
        candidate_parents.append(frontier_ids.repeat_interleave(k, dim=1))
        candidate_depths.append(torch.full((batch, k * k), level + 1, dtype=torch.long, device=device))

        if level + 1 < depth:  # choose the next frontier among the new candidates
            frontier_scores, chosen = child_scores.topk(k, dim=-1)
            parent_slot = chosen // k  # which frontier node each chosen child came from
            frontier_tokens = child_tokens.gather(1, chosen)
            frontier_ids = num_candidates + chosen
            parent_features = draft.next_feature(hidden)
            frontier_inputs = parent_features.gather(1, parent_slot[:, :, None].expand(-1, -1, parent_features.shape[-1]))
            inherited = visible.gather(1, parent_slot[:, :, None].expand(-1, -1, visible.shape[-1]))
            own = torch.eye(k, dtype=torch.bool, device=device).expand(batch, k, k)
            visible = torch.cat((inherited, own), dim=-1)
        num_candidates += k * k

    return _rerank(
        root_tokens,
        torch.cat(candidate_tokens, 1),
        torch.cat(candidate_scores, 1),
        torch.cat(candidate_parents, 1),
        torch.cat(candidate_depths, 1),
        min(total_tokens - 1, num_candidates),
        depth,
    )


def _rerank(root_tokens, tokens, scores, parents, depths, keep: int, depth: int) -> DraftTree:
    """Keep the `keep` best candidates [batch, candidates] by score and index them as tree nodes."""
    batch, num_candidates = tokens.shape
    device = tokens.device
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :keep]
    kept = torch.sort(order, dim=1).values  # candidate order puts parents before children
    node_index = torch.full((batch, num_candidates), -1, dtype=torch.long, device=device)
    node_index.scatter_(1, kept, torch.arange(1, keep + 1, device=device).expand(batch, keep))
    kept_parents = parents.gather(1, kept)
    parent_nodes = torch.where(kept_parents < 0, 0, node_index.gather(1, kept_parents.clamp(min=0)))
    if (parent_nodes < 0).any():
        raise AssertionError("draft tree rerank kept a node without its parent")

    root_column = torch.zeros(batch, 1, dtype=torch.long, device=device)
    all_parents = torch.cat((root_column - 1, parent_nodes), 1)
    return DraftTree(
        tokens=torch.cat((root_tokens[:, None], tokens.gather(1, kept)), 1),
        parents=all_parents,
        depths=torch.cat((root_column, depths.gather(1, kept)), 1),
        ancestors=ancestor_mask(all_parents, depth),
        scores=torch.cat((root_column.float(), scores.gather(1, kept)), 1),
    )
