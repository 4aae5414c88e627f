"""Compression primitives over one image's grid of draft inputs.

Each primitive maps the `[h * w, hidden]` rows of one image (row-major over an `h x w`
grid, any shape) to fewer rows. `num_tokens(h, w)` gives the output count without running
the primitive, which the gate's cost term and the serve-time budget need.

The rows are the draft's fused inputs (after `fc`), not the target's visual tokens: the
target always reads every visual token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ImageContext:
    """Inputs of a primitive besides the rows it compresses."""

    grid: tuple[int, int]  # (h, w), h * w == number of rows
    visual_features: torch.Tensor  # [h * w, hidden] target features at the image's rows
    text_summary: torch.Tensor  # [hidden] mean target feature over the prompt's text rows


def grid_for(count: int) -> tuple[int, int]:
    """Return the grid of `count` visual tokens: square when it is a square, else one row."""
    side = math.isqrt(count)
    return (side, side) if side * side == count else (1, count)


def pooled_grid(h: int, w: int, kernel: int) -> tuple[int, int]:
    return math.ceil(h / kernel), math.ceil(w / kernel)


def kernel_for(ratio: float) -> int:
    """Return the square kernel side whose area is closest to `ratio` (at least 1)."""
    return max(1, round(math.sqrt(ratio)))


def _as_image(rows: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return rows.T.reshape(1, rows.shape[1], h, w)  # [1, hidden, h, w]


def _as_rows(image: torch.Tensor) -> torch.Tensor:
    return image.flatten(2)[0].T  # [h' * w', hidden]


class Prune(nn.Module):
    """Keep the most important rows, in their original order.

    Importance is the cosine similarity of a token's target feature to the prompt's mean
    text feature, so the kept tokens depend on the question. `score="random"` keeps a
    fixed-seed random subset instead (the SpecVLM paper's choice, kept for ablations).
    """

    def __init__(self, ratio: float, score: str = "importance"):
        super().__init__()
        if score not in ("importance", "random"):
            raise ValueError(f"prune score {score!r} is not supported; use 'importance' or 'random'")
        self.ratio, self.score = ratio, score

    def num_tokens(self, h: int, w: int) -> int:
        return max(1, math.ceil(h * w / self.ratio))

    def forward(self, rows: torch.Tensor, context: ImageContext, keep: int | None = None) -> torch.Tensor:
        keep = keep or self.num_tokens(*context.grid)
        if self.score == "random":
            generator = torch.Generator().manual_seed(0)
            scores = torch.rand(rows.shape[0], generator=generator)
        else:
            scores = F.cosine_similarity(context.visual_features.float(), context.text_summary.float()[None], dim=-1)
        indices = scores.topk(keep).indices.sort().values.to(rows.device)
        return rows[indices]


class Pool(nn.Module):
    """Average over `kernel x kernel` cells of the grid (edge cells cover what is left)."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.kernel = kernel_for(ratio)

    def num_tokens(self, h: int, w: int) -> int:
        out_h, out_w = pooled_grid(h, w, self.kernel)
        return out_h * out_w

    def forward(self, rows: torch.Tensor, context: ImageContext) -> torch.Tensor:
        return average_pool(rows, context.grid, self.kernel)


def average_pool(rows: torch.Tensor, grid: tuple[int, int], kernel: int) -> torch.Tensor:
    """Average an image's rows over `kernel x kernel` cells of its grid."""
    h, w = grid
    return _as_rows(F.adaptive_avg_pool2d(_as_image(rows, h, w), pooled_grid(h, w, kernel)))


def pool_to_budget(rows: torch.Tensor, grid: tuple[int, int], budget: int) -> torch.Tensor:
    """Average-pool an image's rows to at most `budget` rows (none for a budget of 0)."""
    if budget <= 0:
        return rows[:0]
    kernel = 1
    while math.prod(pooled_grid(*grid, kernel)) > budget:
        kernel += 1
    return average_pool(rows, grid, kernel)


class Conv(nn.Module):
    """A learned strided convolution; the grid is edge-padded to a multiple of the kernel.

    It starts as average pooling, so an untrained compressor is already a sensible one.
    """

    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.kernel = kernel_for(ratio)
        self.conv = nn.Conv2d(hidden, hidden, self.kernel, stride=self.kernel)
        with torch.no_grad():
            self.conv.weight.zero_()
            eye = torch.eye(hidden) / (self.kernel * self.kernel)
            self.conv.weight += eye[:, :, None, None]
            self.conv.bias.zero_()

    def num_tokens(self, h: int, w: int) -> int:
        out_h, out_w = pooled_grid(h, w, self.kernel)
        return out_h * out_w

    def forward(self, rows: torch.Tensor, context: ImageContext) -> torch.Tensor:
        h, w = context.grid
        k = self.kernel
        image = _as_image(rows, h, w)
        image = F.pad(image, (0, -w % k, 0, -h % k), mode="replicate")
        return _as_rows(self.conv(image.to(self.conv.weight.dtype)))


class Resampler(nn.Module):
    """A few learned queries read the image through one cross-attention layer."""

    def __init__(self, hidden: int, num_queries: int = 2, head_dim: int = 64):
        super().__init__()
        self.num_queries = num_queries
        self.num_heads = max(1, hidden // head_dim)
        if hidden % self.num_heads:
            raise ValueError(f"resampler: hidden size {hidden} is not divisible by {self.num_heads} heads")
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * 0.02)
        self.norm = nn.LayerNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def num_tokens(self, h: int, w: int) -> int:
        return self.num_queries

    def forward(self, rows: torch.Tensor, context: ImageContext) -> torch.Tensor:
        heads = self.num_heads
        keys = self.norm(rows.to(self.queries.dtype))

        def split(x):  # [n, hidden] -> [heads, n, head_dim]
            return x.reshape(x.shape[0], heads, -1).transpose(0, 1)

        q, k, v = split(self.q_proj(self.queries)), split(self.k_proj(keys)), split(self.v_proj(keys))
        read = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(self.num_queries, -1)
        return self.queries + self.o_proj(read)


class TextOnly(nn.Module):
    """Drop every visual token: the draft reads the prompt's text alone."""

    def num_tokens(self, h: int, w: int) -> int:
        return 0

    def forward(self, rows: torch.Tensor, context: ImageContext) -> torch.Tensor:
        return rows[:0]
