"""Helpers to drive an in-process Engine from synchronous tests."""

from __future__ import annotations

import asyncio

import torch
from torch import nn

from draft_models.llama_layers import KVCache
from server.engine.types import RequestOutput, SamplingParams


def run_requests(engine, prompts_and_params) -> list[list[RequestOutput]]:
    """Submit all (prompt, params) pairs at once and collect every output of each."""

    async def collect(index, prompt, params):
        return [output async for output in engine.submit(f"req-{index}", prompt, params)]

    async def main():
        return await asyncio.gather(*(collect(i, p, s) for i, (p, s) in enumerate(prompts_and_params)))

    return asyncio.run(main())


def joined(outputs: list[RequestOutput]) -> tuple[str, RequestOutput]:
    assert outputs[-1].error is None, outputs[-1].error
    return "".join(o.text for o in outputs), outputs[-1]


class OracleDraft(nn.Module):
    """A test draft that proposes a known continuation: after token a it predicts next_token[a].

    It reads the token from its input embedding and smuggles the prediction through the
    hidden state's first channel; `logits` turns it into a one-hot distribution.
    """

    def __init__(self, embed_tokens: nn.Embedding, lm_head: nn.Linear, next_token: dict[int, int]):
        super().__init__()
        self._modules_borrowed = (embed_tokens, lm_head)
        self.next_token = next_token
        self.vocab_size, self.hidden_size = embed_tokens.weight.shape
        self.compressor = None

    @property
    def embed_tokens(self):
        return self._modules_borrowed[0]

    def make_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(1, num_slots, 1, max_len, 1, torch.float32, "cpu")

    def forward(self, input_embeds, features, positions, cache, mask):
        return self.decode_fused(self.fuse(input_embeds, features), positions, cache, mask)

    def fuse(self, input_embeds, features):
        return input_embeds

    def decode_fused(self, input_embeds, positions, cache, mask):
        distances = torch.cdist(input_embeds.float(), self.embed_tokens.weight.float()[None])
        tokens = distances.argmin(dim=-1)  # [batch, num_new]
        hidden = torch.zeros(*tokens.shape, self.hidden_size)
        for index, token in enumerate(tokens.flatten().tolist()):
            hidden.view(-1, self.hidden_size)[index, 0] = self.next_token.get(token, 0)
        return hidden

    def next_feature(self, hidden):
        return hidden

    def logits(self, hidden):
        predicted = hidden[..., 0].long()
        return torch.nn.functional.one_hot(predicted, self.vocab_size).float() * 20.0
