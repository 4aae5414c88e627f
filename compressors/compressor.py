"""SpecVLM's elastic visual compressor for the draft, with a cost-aware gate.

Modes:
- `select`: a gate reads the prompt and the image (the mean target feature of the
  prompt's text rows and of the image's rows) and picks one primitive per image:
  Gumbel-softmax with a straight-through estimator in training, argmax at inference.
  Training adds `cost_weight` times the expected share of visual tokens kept, so the gate
  learns to spend tokens only where they buy accepted length.
- `weight`: the gate's softmax over prune, pool and conv mixes their outputs, all at
  the conv ratio (prune keeps as many rows as the conv makes).
- `concat`: a coarse pool and a finer conv, concatenated (two granularities).
- `none`: every visual row is kept.

A serve-time budget caps the rows per image: `select` takes the gate's best primitive
within it, and the other modes fall back to pooling down to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compressors.primitives import (
    Conv,
    ImageContext,
    Pool,
    Prune,
    Resampler,
    TextOnly,
    average_pool,
    grid_for,
    pool_to_budget,
)

MODES = ("select", "weight", "concat", "none")
PRIMITIVES = ("prune", "pool", "conv", "resampler", "text")
WEIGHTED = ("prune", "pool", "conv")


@dataclass
class CompressorConfig:
    """The compressor part of a draft checkpoint's config.json."""

    mode: str = "select"
    prune_ratio: float = 16.0
    prune_score: str = "importance"
    pool_ratio: float = 16.0
    conv_ratio: float = 4.0
    resampler_queries: int = 2
    gate_hidden: int = 256
    cost_weight: float = 0.1  # weight of the expected kept-token share in the training loss
    gumbel_tau: float = 1.0
    primitives: list[str] = field(default_factory=lambda: list(PRIMITIVES))

    def __post_init__(self):
        if self.mode not in MODES[:-1]:
            raise ValueError(f"compressor mode {self.mode!r} is not supported; use one of {', '.join(MODES[:-1])}")
        unknown = [name for name in self.primitives if name not in PRIMITIVES]
        if unknown or not self.primitives:
            raise ValueError(f"compressor primitives {self.primitives} must be a non-empty subset of {PRIMITIVES}")
        for name in ("prune_ratio", "pool_ratio", "conv_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"compressor {name} {getattr(self, name)} must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressorConfig":
        return cls(**data)


@dataclass
class ImageChoice:
    primitive: str  # what the draft got for this image
    target_tokens: int
    draft_tokens: int


@dataclass
class CompressedSequence:
    rows: torch.Tensor  # [new_len, hidden] the draft's inputs after compression
    source_index: torch.Tensor  # [len] long: new row of each original row (an image's rows: the row before it)
    choices: list[ImageChoice]
    cost: torch.Tensor  # scalar: gate cost term (0 outside select training)


class Gate(nn.Module):
    """A small MLP from (prompt summary, image summary) to one logit per choice."""

    def __init__(self, hidden: int, gate_hidden: int, num_choices: int):
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(2 * hidden, gate_hidden), nn.SiLU(), nn.Linear(gate_hidden, num_choices))

    def forward(self, text_summary: torch.Tensor, image_summary: torch.Tensor) -> torch.Tensor:
        parts = [F.layer_norm(x.float(), (self.hidden,)) for x in (text_summary, image_summary)]
        weight = self.net[0].weight
        return self.net(torch.cat(parts, -1).to(weight.dtype)).float()


class VisualCompressor(nn.Module):
    def __init__(self, config: CompressorConfig, hidden: int):
        super().__init__()
        self.config = config
        self.primitives = nn.ModuleDict({
            "prune": Prune(config.prune_ratio, config.prune_score),
            "pool": Pool(config.pool_ratio),
            "conv": Conv(hidden, config.conv_ratio),
            "resampler": Resampler(hidden, config.resampler_queries),
            "text": TextOnly(),
        })
        self.gate = Gate(hidden, config.gate_hidden, len(PRIMITIVES))

    # ----- one image ----------------------------------------------------------------------

    def gate_logits(self, context: ImageContext) -> torch.Tensor:
        return self.gate(context.text_summary, context.visual_features.float().mean(0))  # [len(PRIMITIVES)]

    def counts(self, grid: tuple[int, int]) -> list[int]:
        return [self.primitives[name].num_tokens(*grid) for name in PRIMITIVES]

    def compress_image(self, rows: torch.Tensor, context: ImageContext, mode: str, budget: int | None
                       ) -> tuple[torch.Tensor, str, torch.Tensor]:
        """Return (compressed rows, primitive name, cost term) for one image."""
        zero = rows.new_zeros((), dtype=torch.float32)
        if mode == "none":
            out, name = rows, "none"
        elif mode == "select":
            return self._select(rows, context, budget)
        elif mode == "weight":
            out, name = self._weight(rows, context), "weight"
        elif mode == "concat":
            out = torch.cat((self.primitives["pool"](rows, context), self.primitives["conv"](rows, context)))
            name = "concat"
        else:
            raise ValueError(f"compressor mode {mode!r} is not supported; use one of {', '.join(MODES)}")
        if budget is not None and out.shape[0] > budget:
            out = pool_to_budget(rows, context.grid, budget)
            name = "pool" if budget > 0 else "text"
        return out, name, zero

    def _select(self, rows, context, budget):
        logits = self.gate_logits(context)
        counts = self.counts(context.grid)
        allowed = torch.tensor(
            [name in self.config.primitives and (budget is None or count <= budget) for name, count in zip(PRIMITIVES, counts)]
        )
        allowed[PRIMITIVES.index("text")] |= not bool(allowed.any())  # text-only always fits
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        if not self.training:
            index = int(logits.argmax())
            name = PRIMITIVES[index]
            return self.primitives[name](rows, context), name, logits.new_zeros(())
        soft = F.softmax(logits, -1)
        uniform = torch.rand_like(logits).clamp(1e-9, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
        sample = F.softmax((logits + gumbel) / self.config.gumbel_tau, -1)
        index = int(sample.argmax())
        straight = (1.0 - sample[index]).detach() + sample[index]  # 1 forward, the sample's gradient backward
        name = PRIMITIVES[index]
        out = self.primitives[name](rows, context) * straight.to(rows.dtype)
        share = torch.tensor(counts, dtype=torch.float32, device=logits.device) / max(rows.shape[0], 1)
        cost = self.config.cost_weight * (soft * share).sum()
        return out, name, cost

    def _weight(self, rows, context):
        logits = self.gate_logits(context)[[PRIMITIVES.index(name) for name in WEIGHTED]]
        weights = F.softmax(logits, -1).to(rows.dtype)
        conv = self.primitives["conv"](rows, context)
        pooled = average_pool(rows, context.grid, self.primitives["conv"].kernel)
        pruned = self.primitives["prune"](rows, context, keep=conv.shape[0])
        return weights[0] * pruned + weights[1] * pooled + weights[2] * conv

    # ----- a whole prompt -----------------------------------------------------------------

    def compress_sequence(
        self,
        rows: torch.Tensor,  # [len, hidden] the draft's fused inputs
        features: torch.Tensor,  # [len, hidden] target features at the same rows
        images: list[tuple[int, int]],  # (start, end) rows of each image, in order
        text_rows: torch.Tensor,  # [len] bool: rows whose features summarise the prompt's text
        mode: str,
        budget: int | None = None,
    ) -> CompressedSequence:
        """Compress each image's rows and keep the other rows as they are."""
        length = rows.shape[0]
        text = features[text_rows]
        text_summary = text.float().mean(0) if text.shape[0] else features.new_zeros(features.shape[-1], dtype=torch.float32)
        pieces, source, choices = [], torch.empty(length, dtype=torch.long), []
        cost = rows.new_zeros((), dtype=torch.float32)
        cursor = new_len = 0
        for start, end in images:
            if start < cursor or end > length or end <= start:
                raise ValueError(f"image rows ({start}, {end}) overlap or fall outside a sequence of {length} rows")
            pieces.append(rows[cursor:start])
            source[cursor:start] = torch.arange(new_len, new_len + start - cursor)
            new_len += start - cursor
            context = ImageContext(grid_for(end - start), features[start:end], text_summary)
            out, name, image_cost = self.compress_image(rows[start:end], context, mode, budget)
            pieces.append(out.to(rows.dtype))
            source[start:end] = max(new_len - 1, 0)
            new_len += out.shape[0]
            cost = cost + image_cost
            choices.append(ImageChoice(name, end - start, out.shape[0]))
            cursor = end
        pieces.append(rows[cursor:])
        source[cursor:] = torch.arange(new_len, new_len + length - cursor)
        return CompressedSequence(torch.cat(pieces), source.to(rows.device), choices, cost)


def image_spans(is_visual: torch.Tensor, num_images: int) -> list[tuple[int, int]]:
    """Return the (start, end) rows of each image from a [len] bool mask of visual rows.

    Adjacent images form one run, so each run is split into equal parts by image count.
    """
    flags = is_visual.tolist()
    runs, start = [], None
    for index, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index))
            start = None
    total = sum(end - start for start, end in runs)
    if num_images <= 0 or total % num_images:
        raise ValueError(f"{total} visual rows cannot be split evenly into {num_images} images")
    per_image = total // num_images
    spans = []
    for start, end in runs:
        if (end - start) % per_image:
            raise ValueError(f"a run of {end - start} visual rows is not a whole number of {per_image}-row images")
        spans.extend((s, s + per_image) for s in range(start, end, per_image))
    return spans
