"""Draft-side visual compressors: fewer visual tokens for the draft, all of them for the target."""

from compressors.compressor import MODES, PRIMITIVES, CompressorConfig, VisualCompressor, image_spans

__all__ = ["MODES", "PRIMITIVES", "CompressorConfig", "VisualCompressor", "image_spans"]
