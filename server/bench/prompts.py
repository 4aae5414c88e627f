"""Benchmark prompts: the first user turn of LLaVA-format records, with their images.

The default set is `data/demo/heldout.json` (prompts the demo draft never saw in
training, half of them with a photo). Any LLaVA or ShareGPT JSON file works, as long as
its image paths resolve against `image_folder` (default: the file's own folder).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from draft_models.training.data import RecordError, load_image, load_records, parse_record, template_messages

# NOTE: data/ is not part of the wheel, so this default exists only in a source checkout
# (or an editable install). Elsewhere pass --prompts.
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "data" / "demo" / "heldout.json"


@dataclass
class BenchPrompt:
    """One prompt: chat messages in the engine's format, with the images they refer to."""

    prompt_id: str
    messages: list[dict]  # content parts {"type": "text", "text": ...} and {"type": "image", "image": PIL.Image}
    images: list[Image.Image] = field(default_factory=list)

    def openai_messages(self) -> list[dict]:
        """Return the messages in the OpenAI chat format, with images as base64 data URLs."""
        converted = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, str):
                converted.append({"role": message["role"], "content": content})
                continue
            parts = []
            for part in content:
                if part["type"] == "image":
                    parts.append({"type": "image_url", "image_url": {"url": _data_url(part["image"])}})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            converted.append({"role": message["role"], "content": parts})
        return converted


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def load_prompts(path: str | Path | None = None, image_folder: str | Path | None = None,
                 limit: int | None = None, text_only: bool = False) -> list[BenchPrompt]:
    """Read up to `limit` prompts, alternating text and image prompts when the file has both.

    Each prompt is the conversation cut before its first assistant turn. Raises
    ValueError naming the file and record when a record cannot be used, because a
    benchmark that silently drops prompts compares different workloads.
    """
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    if not path.is_file():
        raise ValueError(f"prompt file {path} not found; pass --prompts FILE (LLaVA-format JSON)")
    folder = Path(image_folder) if image_folder is not None else path.parent
    text_prompts, image_prompts = [], []
    for index, record in enumerate(load_records(path)):
        try:
            prompt = _parse_prompt(record, index, folder)
        except RecordError as error:
            raise ValueError(f"{path}, record {index}: {error}") from None
        (image_prompts if prompt.images else text_prompts).append(prompt)
    if text_only:
        image_prompts = []

    # Interleave so that a short --num-prompts still covers both kinds.
    mixed = []
    for pair in zip(text_prompts, image_prompts):
        mixed.extend(pair)
    shorter = min(len(text_prompts), len(image_prompts))
    mixed.extend(text_prompts[shorter:] + image_prompts[shorter:])
    if not mixed:
        raise ValueError(f"prompt file {path} contains no records")
    return mixed[:limit] if limit is not None else mixed


def _parse_prompt(record, index: int, folder: Path) -> BenchPrompt:
    conversation = parse_record(record, require_answer=False)
    images = [load_image(folder / relative) for relative in conversation.image_paths]
    messages = []
    for message in template_messages(conversation):
        if message["role"] == "assistant":
            break
        messages.append(message)
    if not any(message["role"] == "user" for message in messages):
        raise RecordError("record has no user turn before its first assistant turn")

    remaining = iter(images)
    for message in messages:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image":
                    part["image"] = next(remaining)
    prompt_id = record.get("id", f"record-{index}") if isinstance(record, dict) else f"record-{index}"
    return BenchPrompt(str(prompt_id), messages, images)
