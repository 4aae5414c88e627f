"""Chat messages to model inputs: chat template, tokenization, image preprocessing."""

from __future__ import annotations

import threading

from server.engine.target import TargetModel
from server.engine.types import PreparedPrompt, PromptError


class PromptBuilder:
    """Turn chat messages into a `PreparedPrompt` with the checkpoint's own processor.

    Thread-safe: HTTP worker threads call `build` concurrently, and a lock serialises the
    tokenizer, whose Rust backend must not be reconfigured while another call uses it.
    """

    def __init__(self, target: TargetModel, max_model_len: int):
        self.target = target
        self.max_model_len = max_model_len
        self._lock = threading.Lock()

    def build(self, messages: list[dict]) -> PreparedPrompt:
        template_messages, images = self._split_images(messages)
        with self._lock:
            if self.target.processor is not None:
                text = self.target.processor.apply_chat_template(
                    template_messages, add_generation_prompt=True, tokenize=False
                )
                inputs = self.target.processor(text=text, images=images or None, return_tensors="pt")
                pixel_values = inputs.get("pixel_values") if images else None
            else:
                text = self.target.tokenizer.apply_chat_template(
                    template_messages, add_generation_prompt=True, tokenize=False
                )
                inputs = self.target.tokenizer(text, add_special_tokens=False, return_tensors="pt")
                pixel_values = None
        token_ids = inputs["input_ids"][0].tolist()
        if len(token_ids) >= self.max_model_len:
            raise PromptError(
                f"the prompt has {len(token_ids)} tokens (visual tokens included), but the context is "
                f"{self.max_model_len} tokens and at least one must be left for the answer; "
                "shorten the messages or send fewer images",
                param="messages",
                code="context_length_exceeded",
            )
        image_token = self.target.image_token_id
        visual = sum(1 for t in token_ids if t == image_token) if image_token is not None else 0
        return PreparedPrompt(token_ids, pixel_values, num_images=len(images), num_visual_tokens=visual)

    def _split_images(self, messages: list[dict]) -> tuple[list[dict], list]:
        """Replace image parts by template placeholders and collect the images in order."""
        template_messages, images = [], []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                template_messages.append({"role": message["role"], "content": content})
                continue
            parts = []
            for part in content:
                if part["type"] == "image":
                    images.append(part["image"])
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            template_messages.append({"role": message["role"], "content": parts})
        if images and self.target.processor is None:
            raise PromptError(
                f"model {self.target.path.name} is text-only and cannot take images; remove the image parts",
                param="messages",
            )
        return template_messages, images
