"""The target's vision tower and projector, run through the checkpoint's Hugging Face modules.

They run once per image, at admission, so generic model code costs nothing that matters
here; only the language model needs our own decoder.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

# Checkpoint prefixes of the vision tower and projector: transformers 5, then 4.
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def _take(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for prefix in prefixes:
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if state:
            return state
    raise ValueError(f"checkpoint has no weights under {' or '.join(prefixes)}")


class VisionEncoder(nn.Module):
    """Map preprocessed images to visual tokens in the language model's embedding space."""

    def __init__(self, config, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        if not isinstance(self.feature_layer, int):
            raise ValueError(f"vision_feature_layer {self.feature_layer!r}: only a single layer is supported")
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.projector = LlavaMultiModalProjector(config)
        self.vision_tower.load_state_dict(_take(tensors, _VISION_PREFIXES))
        self.projector.load_state_dict(_take(tensors, _PROJECTOR_PREFIXES))

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images [num_images, 3, height, width] into [num_images, tokens_per_image, hidden]."""
        param = next(self.vision_tower.parameters())
        outputs = self.vision_tower(pixel_values.to(param.device, param.dtype), output_hidden_states=True)
        selected = outputs.hidden_states[self.feature_layer]
        if self.select_strategy == "default":
            selected = selected[:, 1:]  # drop the CLS token
        return self.projector(selected)
