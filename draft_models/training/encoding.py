"""Render a conversation with the target's chat template and mark its assistant tokens.

The assistant spans are found on the rendered text: for assistant turn k, the span runs
from the end of `render(messages[:k], add_generation_prompt=True)` to the end of
`render(messages[:k + 1])`. Both must be prefixes of the whole rendering, as they are for
templates that render each turn on its own, such as ChatML. A record where they are not
is rejected. Tokens whose character offsets overlap a span are assistant tokens, and each
span's tokens after its last end-of-turn (EOS) token are dropped, so that "<|im_end|>"
counts but the newline after it does not.

The mask is computed on the unexpanded token ids (one `<image>` token per image) and then
stretched over the processor's output, where each image placeholder becomes as many
tokens as the image has visual tokens.
"""

from __future__ import annotations

import bisect

import jinja2
import torch

from draft_models.training.data import Conversation, Example, Prompt, RecordError, template_messages


class ConversationEncoder:
    """Tokenize conversations the way the server tokenizes requests, with an assistant mask."""

    def __init__(self, processor, tokenizer, image_token_id: int | None, eos_token_ids: set[int], max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("draft training needs a fast (Rust) tokenizer, which reports character offsets")
        self.processor = processor  # None for a text-only target
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.eos_token_ids = set(eos_token_ids)
        self.max_length = max_length

    @classmethod
    def for_target(cls, target, max_length: int) -> "ConversationEncoder":
        return cls(target.processor, target.tokenizer, target.image_token_id, target.eos_token_ids, max_length)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        try:
            return owner.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except jinja2.TemplateError as error:
            raise RecordError(f"the chat template rejected the conversation ({error})") from None

    def encode(self, conversation: Conversation, images: list, index: int = -1) -> Example:
        """Return the token ids, assistant mask and pixel values of a whole conversation."""
        messages = template_messages(conversation)
        self._check_images(images)
        text = self.render(messages, add_generation_prompt=False)
        spans = self._assistant_spans(messages, text)

        encoding = self.tokenizer(text, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        mask = self._span_mask(ids, encoding["offset_mapping"], spans)
        full_ids, pixel_values = self._expand(text, ids, images)
        full_mask = self._stretch_mask(ids, mask, full_ids)
        return self._truncate(full_ids, full_mask, pixel_values, index)

    def prompt(self, conversation: Conversation, images: list, index: int = -1) -> Prompt:
        """Return the conversation up to its first assistant turn (or all of it), with the generation prompt."""
        messages = template_messages(conversation)
        self._check_images(images)
        first_answer = next((k for k, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        if first_answer == 0:
            raise RecordError("the conversation starts with an assistant turn, so it has no prompt")
        text = self.render(messages[:first_answer], add_generation_prompt=True)
        ids = self.tokenizer(text)["input_ids"]
        full_ids, pixel_values = self._expand(text, ids, images)
        if len(full_ids) > self.max_length:
            raise RecordError(f"the prompt has {len(full_ids)} tokens, more than the maximum length {self.max_length}")
        return Prompt(torch.tensor(full_ids, dtype=torch.long), pixel_values, index)

    def _check_images(self, images: list) -> None:
        if images and self.processor is None:
            raise RecordError("record has an image, but the target is text-only")

    def _assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Return the character range [start, end) of each assistant turn in `text`."""
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True) if k else ""
            through = self.render(messages[: k + 1], add_generation_prompt=False)
            if not through.startswith(before) or not text.startswith(through):
                raise RecordError(
                    "the chat template does not render the conversation turn by turn, so the assistant "
                    "tokens cannot be located"
                )
            spans.append((len(before), len(through)))
        return spans

    def _span_mask(self, ids: list[int], offsets: list[tuple[int, int]], spans) -> list[bool]:
        mask = [False] * len(ids)
        starts = [start for start, _ in offsets]
        for span_start, span_end in spans:
            # Tokens overlapping [span_start, span_end); offsets are sorted by start.
            first = max(bisect.bisect_right(starts, span_start) - 1, 0)
            members = [
                i for i in range(first, len(ids))
                if offsets[i][0] < span_end and offsets[i][1] > span_start and offsets[i][1] > offsets[i][0]
            ]
            ends_of_turn = [i for i in members if ids[i] in self.eos_token_ids]
            if ends_of_turn:
                members = [i for i in members if i <= ends_of_turn[-1]]
            for i in members:
                mask[i] = True
        return mask

    def _expand(self, text: str, ids: list[int], images: list) -> tuple[list[int], torch.Tensor | None]:
        """Return the processor's token ids (image placeholders expanded) and pixel values."""
        if not images:
            return ids, None
        inputs = self.processor(text=text, images=images, return_tensors="pt")
        return inputs["input_ids"][0].tolist(), inputs["pixel_values"]

    def _stretch_mask(self, ids: list[int], mask: list[bool], full_ids: list[int]) -> list[bool]:
        """Map the mask over `ids` onto `full_ids`, where each image token became a run of them."""
        if full_ids is ids:
            return mask
        image = self.image_token_id
        full_mask: list[bool] = []
        position = 0
        for i, token in enumerate(ids):
            if token == image:
                if i > 0 and ids[i - 1] == image:
                    continue  # adjacent images: the previous placeholder took the whole run
                run = 0
                while position + run < len(full_ids) and full_ids[position + run] == image:
                    run += 1
                if run == 0:
                    raise RecordError("the processor did not expand an image placeholder where expected")
                full_mask.extend([False] * run)
                position += run
                continue
            if position >= len(full_ids) or full_ids[position] != token:
                raise RecordError("the processor's tokens differ from the tokenizer's outside the image placeholders")
            full_mask.append(mask[i])
            position += 1
        if position != len(full_ids):
            raise RecordError("the processor produced tokens that the tokenizer did not")
        return full_mask

    def _truncate(self, ids: list[int], mask: list[bool], pixel_values, index: int) -> Example:
        """Cut to the maximum length, never through an image's visual tokens."""
        cut = min(len(ids), self.max_length)
        if pixel_values is not None and cut < len(ids):
            is_visual = [token == self.image_token_id for token in ids]
            # NOTE: assumes every image has the same number of visual tokens (true for LLaVA,
            # not for any-resolution models such as LLaVA-NeXT).
            per_image = sum(is_visual) // pixel_values.shape[0]
            visual_before = sum(is_visual[:cut])
            while visual_before % per_image:  # inside an image's run: back up to its start
                cut -= 1
                visual_before -= is_visual[cut]
            kept_images = visual_before // per_image
            pixel_values = pixel_values[:kept_images] if kept_images else None
        ids, mask = ids[:cut], mask[:cut]
        # The draft at position i predicts token i + 2, so only assistant tokens from index 2 on count.
        if not any(mask[2:]):
            raise RecordError(f"no assistant tokens within the first {self.max_length} tokens")
        return Example(
            torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), pixel_values, index
        )
