"""Online logit distillation: the frozen target as teacher, and the draft's loss.

For a sequence with target features f, input embeddings e (visual tokens included) and
tokens t, the draft at position i reads (e[i + 1], f[i] + noise) and its output predicts
f[i + 1]. The loss at position i is

    feature_weight * SmoothL1(next_feature(out_i), f[i + 1])
    + ce_weight * softCE(logits(out_i), softmax(target logits at i + 1))

(weights 1.0 and 0.1 by default), averaged over the positions whose predicted token
t[i + 2] is an assistant token. With partial alignment the two terms reach different
halves of the draft output, because `logits` and `next_feature` read different halves.

Training-time test (unrolled steps, as in HASS and EAGLE-3). When drafting, only the
first draft step reads a target feature, and step k reads the feature that the draft
itself predicted at step k - 1. A draft trained on target features alone never sees its
own errors as input, so its acceptance falls off quickly with depth. With `unroll_steps`
k > 1, step s (s = 0 .. k - 1) at position i reads (e[i + 1 + s], the draft's step s - 1
prediction at i) and predicts f[i + 1 + s]. Its query attends to the step-0 keys at
positions up to i, as drafting attends to the committed context, and to the keys of the
earlier steps at i only, as drafting attends to the path it drafted. The loss of step s
is weighted UNROLL_WEIGHT ** s, and the weighted terms are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressors import image_spans
from draft_models.eagle import EagleDraft
from draft_models.llama_layers import AttentionMask, KVCache
from draft_models.training.data import Batch

# Uniform feature noise as in EAGLE's training code: (U - 0.5) * NOISE_SCALE * 512 / seq_len.
NOISE_SCALE = 0.2
NOISE_REFERENCE_LENGTH = 512
# Unrolled step s weighs UNROLL_WEIGHT ** s relative to step 0. Later steps count less, because a
# later draft token is only accepted when every earlier one was.
UNROLL_WEIGHT = 0.8


@dataclass
class TeacherOutput:
    input_embeds: torch.Tensor  # [batch, max_len, hidden] draft dtype, visual tokens included, 0 on padding
    features: torch.Tensor  # [batch, max_len, hidden] target dtype


@dataclass
class LossTerms:
    total: torch.Tensor  # scalar, what backward runs on
    feature: torch.Tensor  # scalar, SmoothL1 term before weighting
    cross_entropy: torch.Tensor  # scalar, soft cross-entropy before weighting
    accuracy: torch.Tensor  # scalar, draft top-1 == target top-1 at the counted positions
    num_positions: int


class Teacher:
    """Runs the frozen target over a padded batch and returns its features.

    The KV cache is kept between batches and grown when a batch needs more rows or length.
    """

    def __init__(self, target, draft_dtype: torch.dtype):
        self.target = target
        self.draft_dtype = draft_dtype
        self.cache: KVCache | None = None

    @torch.no_grad()
    def __call__(self, batch: Batch) -> TeacherOutput:
        device = self.target.device
        rows, max_len = batch.token_ids.shape
        hidden = self.target.hidden_size
        embeds = torch.zeros(rows, max_len, hidden, dtype=self.target.dtype, device=device)
        for row, (length, pixel_values) in enumerate(zip(batch.lengths, batch.pixel_values)):
            # embed_prompt returns inference-mode tensors; copying them into `embeds` makes normal ones.
            embeds[row, :length] = self.target.embed_prompt(batch.token_ids[row, :length], pixel_values)

        if self.cache is None or self.cache.num_slots < rows or self.cache.max_len < max_len:
            self.cache = None  # free the old cache before allocating the new one
            self.cache = self.target.decoder.make_cache(rows, max_len)
        slots = torch.arange(rows, device=device)
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        causal = AttentionMask.causal(max_len, device).expand(rows, max_len, max_len)
        mask = AttentionMask.build(slots, zeros, zeros, causal)
        positions = torch.arange(max_len, device=device).expand(rows, max_len)
        features = self.target.decoder(embeds, positions, self.cache, mask)
        return TeacherOutput(embeds.to(self.draft_dtype), features)


class TeacherForcedDraft(nn.Module):
    """The draft over whole sequences at once: a fresh cache, a causal mask, positions from 0.

    This is the module that DistributedDataParallel wraps, so that its forward takes tensors only.
    With a visual compressor, each row's images are compressed, the shorter rows run with
    their own contiguous positions, and the outputs are mapped back to the original rows
    (an image's rows get the output of the row before the image; no loss counts them).
    Unrolled steps (`later_embeds`) run on the uncompressed rows only.
    """

    def __init__(self, draft: EagleDraft):
        super().__init__()
        self.draft = draft

    def forward(
        self,
        input_embeds: torch.Tensor,  # [batch, num_positions, hidden] e[i + 1]
        features: torch.Tensor,  # [batch, num_positions, hidden] f[i] (with noise)
        visual_rows: torch.Tensor | None = None,  # [batch, num_positions] bool: token i is visual
        prompt_rows: torch.Tensor | None = None,  # [batch, num_positions] bool: text rows of the prompt
        num_images: torch.Tensor | None = None,  # [batch] images per row
        later_embeds: torch.Tensor | None = None,  # [steps - 1, batch, num_positions, hidden] e[i + 1 + s]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return the raw draft output [batch, num_positions, output size], the compressor's cost term,
        and the outputs of the unrolled steps [steps - 1, batch, num_positions, output size] (None without).
        """
        fused = self.draft.fuse(input_embeds, features)
        compressor = self.draft.compressor
        if compressor is None or visual_rows is None or not bool(visual_rows.any()):
            output = _decode_steps(self.draft, [fused])
            later = None if later_embeds is None else self._unroll(fused, output, later_embeds)
            return output, fused.new_zeros((), dtype=torch.float32), later
        if later_embeds is not None:
            raise ValueError("unrolled training steps do not support a visual compressor yet, so train with --unroll-steps 1")

        rows, sources, cost = [], [], fused.new_zeros((), dtype=torch.float32)
        for row in range(fused.shape[0]):
            count = int(num_images[row])
            spans = image_spans(visual_rows[row], count) if count else []
            compressed = compressor.compress_sequence(
                fused[row], features[row], spans, prompt_rows[row], compressor.config.mode
            )
            rows.append(compressed.rows)
            sources.append(compressed.source_index)
            cost = cost + compressed.cost
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        output = _decode_steps(self.draft, [padded])
        index = torch.stack(sources)[:, :, None].expand(-1, -1, output.shape[-1])
        # Every compressor parameter joins the graph, so DDP reduces the primitives this batch skipped.
        unused = sum(parameter.sum() for parameter in compressor.parameters()) * 0.0
        return output.gather(1, index), cost / fused.shape[0] + unused, None

    def _unroll(self, fused: torch.Tensor, output: torch.Tensor, later_embeds: torch.Tensor) -> torch.Tensor:
        """Run the unrolled steps, each over the fused inputs of all steps so far; return their outputs stacked."""
        steps = [fused]
        outputs = []
        for embeds in later_embeds:
            steps.append(self.draft.fuse(embeds, self.draft.next_feature(output)))
            output = _decode_steps(self.draft, steps)
            outputs.append(output)
        return torch.stack(outputs)


def _decode_steps(draft: EagleDraft, steps: list[torch.Tensor]) -> torch.Tensor:
    """Return the draft output for the last of the fused step inputs [batch, count, hidden].

    The steps run as one sequence, step after step. Step s at position i has rotary position
    i + s and attends to step 0 causally and to steps 1 .. s at position i only. A single
    step is a plain causal pass over the sequence.
    """
    rows, count, _ = steps[0].shape
    device = steps[0].device
    num_steps = len(steps)
    causal = AttentionMask.causal(count, device)
    diagonal = torch.eye(count, dtype=torch.bool, device=device)
    region = torch.zeros(num_steps * count, num_steps * count, dtype=torch.bool, device=device)
    for query in range(num_steps):
        rows_of_query = slice(query * count, (query + 1) * count)
        region[rows_of_query, :count] = causal
        for key in range(1, query + 1):
            region[rows_of_query, key * count : (key + 1) * count] = diagonal
    total = num_steps * count
    cache = draft.make_cache(rows, total)  # fresh, because autograd must not chain steps through a reused cache
    zeros = torch.zeros(rows, dtype=torch.long, device=device)
    mask = AttentionMask.build(torch.arange(rows, device=device), zeros, zeros, region.expand(rows, total, total))
    positions = torch.arange(count, device=device)
    positions = torch.cat([positions + step for step in range(num_steps)]).expand(rows, total)
    output = draft.decode_fused(torch.cat(steps, dim=1), positions, cache, mask)
    return output[:, -count:]


def feature_noise(features: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Return uniform noise shaped like `features`, scaled by 512 / seq_len.

    Like EAGLE, seq_len is the padded length of the batch, not each row's own length.
    """
    scale = NOISE_SCALE * NOISE_REFERENCE_LENGTH / seq_len
    return (torch.rand_like(features) - 0.5) * scale


def draft_inputs(teacher: TeacherOutput, noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the draft's (e[i + 1], f[i]) for i in [0, max_len - 1), each [batch, max_len - 1, hidden]."""
    features = teacher.features[:, :-1].to(teacher.input_embeds.dtype)
    if noise:
        features = features + feature_noise(features, teacher.features.shape[1])
    return teacher.input_embeds[:, 1:], features


def unrolled_embeds(teacher: TeacherOutput, steps: int) -> torch.Tensor | None:
    """Return e[i + 1 + s] for the unrolled steps s = 1 .. steps - 1 as [steps - 1, batch, max_len - 1, hidden].

    Positions past the end are 0, and no loss counts them. Returns None when there is nothing to unroll.
    """
    if steps <= 1:
        return None
    embeds = teacher.input_embeds
    rows, max_len, hidden = embeds.shape
    later = embeds.new_zeros(steps - 1, rows, max_len - 1, hidden)
    for step in range(1, steps):
        later[step - 1, :, : max_len - 1 - step] = embeds[:, 1 + step :]
    return later


def loss_positions(assistant_mask: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Return the bool mask [batch, max_len - 1] of positions i whose step-`step` token i + 2 + step is an assistant token."""
    counted = torch.zeros(assistant_mask.shape[0], assistant_mask.shape[1] - 1, dtype=torch.bool)
    kept = assistant_mask.shape[1] - 2 - step
    if kept > 0:
        counted[:, :kept] = assistant_mask[:, 2 + step :]
    return counted


def distillation_loss(
    draft: EagleDraft,
    output: torch.Tensor,  # [batch, max_len - 1, output size] draft output at positions i
    teacher: TeacherOutput,
    target_logits,  # callable: target features [n, hidden] -> float32 logits [n, vocab]
    assistant_mask: torch.Tensor,  # [batch, max_len] bool
    feature_weight: float = 1.0,
    ce_weight: float = 0.1,
    step: int = 0,
) -> LossTerms:
    """Return the weighted feature + soft cross-entropy loss over the counted positions.

    `output` is the draft's output at unrolled step `step`, which predicts f[i + 1 + step].
    Logits are computed at the counted positions only, since the vocabulary is large.
    """
    counted = loss_positions(assistant_mask, step).to(output.device)
    num_positions = int(counted.sum())
    if num_positions == 0:
        zero = output.sum() * 0.0  # keeps every parameter in the graph, so DDP still reduces
        return LossTerms(zero, zero.detach(), zero.detach(), zero.detach(), 0)

    draft_out = output[counted]  # [n, output size]
    next_features = teacher.features[:, 1 + step :]  # f[i + 1 + step], `step` positions shorter than `counted`
    next_features = next_features[counted[:, : next_features.shape[1]]]  # [n, hidden], target dtype
    with torch.no_grad():
        target_probs = torch.softmax(target_logits(next_features), dim=-1)  # [n, vocab]
    predicted = draft.next_feature(draft_out)
    feature = F.smooth_l1_loss(predicted, next_features.to(predicted.dtype))
    logits = draft.logits(draft_out)  # [n, vocab] float32
    cross_entropy = -(target_probs * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    accuracy = (logits.argmax(-1) == target_probs.argmax(-1)).float().mean()
    total = feature_weight * feature + ce_weight * cross_entropy
    return LossTerms(total, feature.detach(), cross_entropy.detach(), accuracy.detach(), num_positions)
