"""Conversation data for draft training: JSON records to token ids, assistant masks and images.

Two record formats are read, from a JSON list or a JSON-lines file:
- LLaVA: `{"id", "image": "relative/path.jpg" (optional, or a list), "conversations":
  [{"from": "human" | "gpt" | "system", "value": "..."}]}`, where `<image>` in a human
  turn marks where the image goes (without a marker the image goes before the first
  user turn's text). Images are resolved against the image folder and loaded lazily.
- ShareGPT-style text-only records: the same without images. Turns may also use the keys
  `{"role", "content"}`, and the list may be called `messages`.

Each record is rendered with the target's own chat template (image parts as
`{"type": "image"}`, as the server renders a request) and tokenized with the target's
processor, which expands each image placeholder into the visual-token placeholders. The
assistant mask marks the tokens of each assistant turn: its content and its end-of-turn
token. The spans come from rendering growing prefixes of the conversation.

A record that cannot be used raises `RecordError`: a bad structure, an unreadable image,
or no assistant token left after truncation. `ConversationDataset` logs such a record
once with its index, counts it and skips it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"

# Turn speaker names in LLaVA / ShareGPT / OpenAI-style records -> chat template roles.
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """A training record that cannot be used; the message gives the reason."""


@dataclass
class Conversation:
    """One parsed record: chat messages with string content, plus the record's image paths."""

    messages: list[dict]  # {"role": "user" | "assistant" | "system", "content": str}
    image_paths: list[str] = field(default_factory=list)


@dataclass
class Example:
    """One tokenized conversation, ready for the teacher."""

    token_ids: torch.Tensor  # [num_tokens] long, visual-token placeholders included
    assistant_mask: torch.Tensor  # [num_tokens] bool, True on assistant tokens
    pixel_values: torch.Tensor | None  # [num_images, 3, height, width] or None
    index: int = -1  # position of the record in its file; -1 for a placeholder


@dataclass
class Prompt:
    """A conversation cut before its first assistant turn, for evaluation."""

    token_ids: torch.Tensor  # [num_tokens] long
    pixel_values: torch.Tensor | None
    index: int


class _InvalidLine:
    """Stands in for a JSON-lines line that does not parse, so it is skipped like any bad record."""

    def __init__(self, message: str):
        self.message = message


def load_records(path: str | Path) -> list:
    """Read records from a JSON list or a JSON-lines file.

    Raises ValueError when the file as a whole is not one of those formats.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records: list = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                records.append(_InvalidLine(f"line {number} is not valid JSON ({error.msg})"))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}); expected a list of records") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} contains a JSON {type(data).__name__}; expected a list of records")
    return data


def parse_record(record, require_answer: bool = True) -> Conversation:
    """Validate one record and return its messages and image paths. Raises RecordError.

    Without `require_answer`, a record whose turns are all prompts (a held-out prompt file
    with empty answers) is accepted too.
    """
    if isinstance(record, _InvalidLine):
        raise RecordError(record.message)
    if not isinstance(record, dict):
        raise RecordError(f"record is a JSON {type(record).__name__}, expected an object")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise RecordError("record has no 'conversations' (or 'messages') list of turns")

    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {number} is not an object")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker not in ROLES:
            raise RecordError(f"turn {number} has speaker {speaker!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(text, str):
            raise RecordError(f"turn {number} has no string 'value' (or 'content')")
        messages.append({"role": ROLES[speaker], "content": text})
    if require_answer and not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RecordError("record has no assistant turn with text")

    image = record.get("image")
    if image is None:
        image_paths = []
    elif isinstance(image, str):
        image_paths = [image]
    elif isinstance(image, list) and all(isinstance(item, str) for item in image):
        image_paths = list(image)
    else:
        raise RecordError("record field 'image' must be a path or a list of paths")
    return Conversation(messages, image_paths)


def load_image(path: Path) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert it to RGB. Raises RecordError."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise RecordError(f"image {path} not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise RecordError(f"image {path} cannot be read ({error})") from None


def template_messages(conversation: Conversation) -> list[dict]:
    """Turn `<image>` markers into image parts, as the chat template expects them.

    Text beside a marker is stripped, as LLaVA's own preprocessing does. Raises RecordError
    when the markers and the images do not pair up.
    """
    num_images = len(conversation.image_paths)
    num_markers = sum(m["content"].count(IMAGE_MARKER) for m in conversation.messages if m["role"] == "user")
    if num_markers not in (0, num_images):
        raise RecordError(f"record has {num_markers} {IMAGE_MARKER} markers but {num_images} images")
    messages = [dict(message) for message in conversation.messages]
    if num_images and not num_markers:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RecordError("record has an image but no user turn to place it in")
        first_user["content"] = IMAGE_MARKER + first_user["content"]
    for message in messages:
        if message["role"] != "user" or IMAGE_MARKER not in message["content"]:
            continue
        parts = []
        for number, piece in enumerate(message["content"].split(IMAGE_MARKER)):
            if number > 0:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        message["content"] = parts
    return messages


class ConversationDataset(torch.utils.data.Dataset):
    """Records encoded on access; a record that cannot be used yields None and is counted.

    `encoder` is a `draft_models.training.encoding.ConversationEncoder`.
    """

    def __init__(self, records: list, encoder, image_folder: str | Path | None = None, name: str = "data"):
        self.records = records
        self.encoder = encoder
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.name = name
        self.skipped: dict[int, str] = {}  # record index -> reason, each logged once

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example | None:
        try:
            conversation = parse_record(self.records[index])
            images = [load_image(self.resolve_image(path)) for path in conversation.image_paths]
            return self.encoder.encode(conversation, images, index)
        except RecordError as error:
            self.skip(index, str(error))
            return None

    def prompt(self, index: int) -> Prompt | None:
        """Return record `index` cut before its first assistant turn, or None (counted) if it cannot be used."""
        try:
            conversation = parse_record(self.records[index], require_answer=False)
            images = [load_image(self.resolve_image(path)) for path in conversation.image_paths]
            return self.encoder.prompt(conversation, images, index)
        except RecordError as error:
            self.skip(index, str(error))
            return None

    def resolve_image(self, relative: str) -> Path:
        path = Path(relative)
        if path.is_absolute():
            return path
        if self.image_folder is None:
            raise RecordError(f"record has image {relative!r} but no image folder was given (--image-folder)")
        return self.image_folder / path

    def skip(self, index: int, reason: str) -> None:
        if index not in self.skipped:
            self.skipped[index] = reason
            logger.warning("skipping %s record %d: %s", self.name, index, reason)


@dataclass
class Batch:
    """Right-padded examples; rows keep their own lengths and images."""

    token_ids: torch.Tensor  # [batch, max_len] long, 0 past each row's length
    assistant_mask: torch.Tensor  # [batch, max_len] bool, False past each row's length
    lengths: list[int]
    pixel_values: list[torch.Tensor | None]
    indices: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


def placeholder_example(token_id: int) -> Example:
    """Return an example with no assistant token, which adds nothing to the loss.

    It fills a batch whose records were all skipped, so that every process still runs its
    forward and backward (DistributedDataParallel needs each process to take part).
    """
    return Example(torch.full((3,), token_id, dtype=torch.long), torch.zeros(3, dtype=torch.bool), None)


def collate(examples: list[Example | None], fill_token_id: int) -> Batch:
    """Pad the usable examples into a batch; a batch with none left gets a placeholder."""
    usable = [example for example in examples if example is not None]
    if not usable:
        usable = [placeholder_example(fill_token_id)]
    max_len = max(len(example.token_ids) for example in usable)
    token_ids = torch.zeros(len(usable), max_len, dtype=torch.long)
    mask = torch.zeros(len(usable), max_len, dtype=torch.bool)
    for row, example in enumerate(usable):
        count = len(example.token_ids)
        token_ids[row, :count] = example.token_ids
        mask[row, :count] = example.assistant_mask
    return Batch(
        token_ids, mask, [len(e.token_ids) for e in usable], [e.pixel_values for e in usable], [e.index for e in usable]
    )
