"""One speculative step for a batch of slots: draft tree, verify, accept, commit.

Cache invariant per slot: the target cache contains `cache_len` committed positions and
the draft cache `cache_len - draft_offset`, where `draft_offset` is the number of visual
rows the compressor removed from the draft's view of the prompt (the draft's positions
are contiguous over its own, shorter sequence). The last committed token (the root of
the next tree) is in neither cache yet, and `root_hidden` is the draft's output at the
position before the root (it predicts the root's feature and, through the LM head, the
root's children).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressors import image_spans
from compressors.compressor import ImageChoice
from draft_models.eagle import EagleDraft
from draft_models.llama_layers import AttentionMask
from server.engine.sampling import Acceptance, accept_greedy, accept_sampled, sample_token, target_probs
from server.engine.target import TargetModel
from server.engine.tree import DraftTree, build_draft_tree, root_only_tree
from server.engine.types import SamplingParams


@dataclass
class SlotState:
    slot: int
    cache_len: int
    root_token: int
    root_hidden: torch.Tensor | None = None  # [draft output size]
    draft_offset: int = 0  # visual rows the draft does not see
    compressor_choices: list[ImageChoice] = field(default_factory=list)  # one per image; empty without a draft

    @property
    def draft_len(self) -> int:
        return self.cache_len - self.draft_offset


@dataclass
class StepResult:
    committed: list[int]  # accepted draft tokens then the bonus token
    num_draft_tokens: int  # tree nodes proposed, root excluded


class SpeculativeDecoder:
    """Owns the KV caches and runs prefill and batched steps on the engine thread."""

    def __init__(self, target: TargetModel, draft: EagleDraft | None, num_slots: int, max_model_len: int,
                 depth: int, top_k: int, total_tokens: int, compressor_mode: str = "auto",
                 visual_budget: int | None = None):
        self.target = target
        self.draft = draft
        self.compressor_mode = resolve_compressor_mode(compressor_mode, draft)
        self.visual_budget = visual_budget
        self.depth, self.top_k, self.total_tokens = depth, top_k, total_tokens
        # Room past the context for the nodes a step writes after the committed tokens: the
        # largest tree these depth and top_k can make (so the tree size may change later),
        # and the draft's scratch levels.
        self.max_tree_tokens = min(1 + top_k + (depth - 1) * top_k * top_k, 256)
        margin = max(total_tokens, self.max_tree_tokens, depth * top_k) + 1
        self.capacity = max_model_len + margin
        self.target_cache = target.decoder.make_cache(num_slots, self.capacity)
        self.draft_cache = draft.make_cache(num_slots, self.capacity) if draft is not None else None
        self.device = target.device

    def kv_cache_bytes(self) -> int:
        caches = [self.target_cache] + ([self.draft_cache] if self.draft_cache is not None else [])
        return sum(cache.memory_bytes() for cache in caches)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: torch.Tensor, pixel_values, params: SamplingParams,
                generator: torch.Generator | None) -> SlotState:
        """Run the target and draft over the prompt and sample the first token (the root)."""
        embeds = self.target.embed_prompt(token_ids, pixel_values)[None]  # [1, n, hidden]
        count = embeds.shape[1]
        zero = self._tensor([0])
        mask = AttentionMask.build(self._tensor([slot]), zero, zero, AttentionMask.causal(count, self.device)[None])
        positions = torch.arange(count, device=self.device)[None]
        features = self.target.decoder(embeds, positions, self.target_cache, mask)  # [1, n, hidden]
        logits = self.target.decoder.logits(features[:, -1])[0]
        first = self._choose(logits, params, generator)
        state = SlotState(slot=slot, cache_len=count, root_token=first)
        if self.draft is not None:
            next_embeds = torch.cat((embeds[:, 1:], self.target.decoder.embed_tokens(self._tensor([[first]]))), 1)
            fused = self.draft.fuse(next_embeds, features)  # [1, n, hidden]
            if pixel_values is not None and self.target.image_token_id is not None:
                fused, state.compressor_choices = self._compress(fused, features, token_ids, pixel_values.shape[0])
            length = fused.shape[1]
            draft_mask = AttentionMask.build(self._tensor([slot]), zero, zero, AttentionMask.causal(length, self.device)[None])
            draft_positions = torch.arange(length, device=self.device)[None]
            hidden = self.draft.decode_fused(fused, draft_positions, self.draft_cache, draft_mask)
            state.root_hidden = hidden[0, -1]
            state.draft_offset = count - length
        return state

    def _compress(self, fused, features, token_ids, num_images) -> tuple[torch.Tensor, list[ImageChoice]]:
        """Return the draft's rows with each image compressed, and what each image got."""
        is_visual = token_ids.to(self.device) == self.target.image_token_id
        spans = image_spans(is_visual, num_images)
        if self.compressor_mode == "none":
            return fused, [ImageChoice("none", end - start, end - start) for start, end in spans]
        compressed = self.draft.compressor.compress_sequence(
            fused[0], features[0], spans, ~is_visual, self.compressor_mode, self.visual_budget
        )
        return compressed.rows[None], compressed.choices

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, generator) -> int:
        if params.greedy:
            return int(logits.argmax())
        return sample_token(target_probs(logits.cpu(), params), generator)

    @torch.inference_mode()
    def step(self, states: list[SlotState], params: list[SamplingParams],
             generators: list[torch.Generator | None]) -> list[StepResult]:
        """Advance every slot by one step and update `states` in place."""
        slots = self._tensor([s.slot for s in states])
        cache_len = self._tensor([s.cache_len for s in states])
        roots = self._tensor([s.root_token for s in states])
        if self.draft is None:
            tree = root_only_tree(roots)
        else:
            root_hidden = torch.stack([s.root_hidden for s in states])
            draft_len = self._tensor([s.draft_len for s in states])
            tree = build_draft_tree(self.draft, self.draft_cache, slots, draft_len, roots, root_hidden,
                                    self.depth, self.top_k, self.total_tokens)

        features, logits = self._verify(tree, slots, cache_len)
        acceptances = self._accept(tree, logits, params, generators)
        self._commit(tree, acceptances, features, slots, cache_len, states)
        return [
            StepResult(committed=[int(tree.tokens[row, n]) for n in acc.path[1:]] + [acc.bonus_token],
                       num_draft_tokens=tree.num_nodes - 1)
            for row, acc in enumerate(acceptances)
        ]

    def _verify(self, tree: DraftTree, slots, cache_len):
        """Run the target over all tree nodes; return features and float32 logits [batch, nodes, ...]."""
        mask = AttentionMask.build(slots, cache_len, cache_len, tree.ancestors)
        embeds = self.target.decoder.embed_tokens(tree.tokens)
        features = self.target.decoder(embeds, cache_len[:, None] + tree.depths, self.target_cache, mask)
        return features, self.target.decoder.logits(features)

    def _accept(self, tree, logits, params, generators) -> list[Acceptance]:
        results = accept_greedy(tree, logits)  # cheap; replaced below for sampled rows
        for row, request in enumerate(params):
            if not request.greedy:
                probs = target_probs(logits[row].cpu(), request)
                results[row] = accept_sampled(tree.tokens[row].tolist(), tree.parents[row].tolist(), probs, generators[row])
        return results

    def _commit(self, tree, acceptances, features, slots, cache_len, states) -> None:
        """Make accepted KV entries contiguous and feed the committed tokens to the draft."""
        width = max(len(acc.path) for acc in acceptances)
        paths = self._tensor([acc.path + [acc.path[-1]] * (width - len(acc.path)) for acc in acceptances])
        self.target_cache.move(slots, cache_len[:, None] + paths, cache_len)
        if self.draft is not None:
            path_features = features.gather(1, paths[:, :, None].expand(-1, -1, features.shape[-1]))
            next_tokens = []
            for row, acc in enumerate(acceptances):
                tokens = [int(tree.tokens[row, n]) for n in acc.path[1:]] + [acc.bonus_token]
                next_tokens.append(tokens + [acc.bonus_token] * (width - len(tokens)))
            draft_len = self._tensor([s.draft_len for s in states])
            mask = AttentionMask.build(slots, draft_len, draft_len,
                                       AttentionMask.causal(width, self.device).expand(len(states), width, width))
            positions = draft_len[:, None] + torch.arange(width, device=self.device)
            embeds = self.target.decoder.embed_tokens(self._tensor(next_tokens))
            hidden = self.draft(embeds, path_features, positions, self.draft_cache, mask)
        for row, (state, acc) in enumerate(zip(states, acceptances)):
            state.cache_len += len(acc.path)
            state.root_token = acc.bonus_token
            if self.draft is not None:
                state.root_hidden = hidden[row, len(acc.path) - 1]


def resolve_compressor_mode(setting: str, draft: EagleDraft | None) -> str:
    """Return the compressor mode to run: `auto` is the draft's trained mode, or none without a compressor."""
    compressor = draft.compressor if draft is not None else None
    if setting == "auto":
        return compressor.config.mode if compressor is not None else "none"
    if setting != "none" and compressor is None:
        raise ValueError(
            f"--draft-compressor {setting}: the draft has no visual compressor; train one with "
            "`specvlm train-draft --compressor MODE`, or pass --draft-compressor none"
        )
    return setting
