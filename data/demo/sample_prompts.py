"""Sample extra training prompts from the demo target itself.

    python data/demo/sample_prompts.py --count 2000    # writes prompts_sampled.json

The hand-written prompts cover 112 topics, and a draft trained only on their answers
learns those answers rather than the target. After 9 epochs on them, a demo draft had
teacher-forced top-1 accuracy 0.78 on them and 0.44 on the held-out set. An
instruction-tuned model asked to continue its chat template right after the user header
writes a plausible user request (Magpie, Xu et al. 2024, arXiv:2406.08464), so sampling
there gives prompts on whatever topics the target has learned. `specvlm self-distill`
then writes the target's replies into the empty assistant turns.

A sampled request is kept only if the target ended it (no truncated requests), it has at
least three words, and it is not a repeat of an earlier one. It must also name no
held-out topic (`prompt_parts.HELDOUT_KEYWORDS`), so the held-out set stays unseen. A
share of the kept requests is paired with one of the training photos. The output is
deterministic for a given seed, batch size and machine, because each batch is sampled
from its own seed.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

import prompt_parts as parts

DEFAULT_SEED = 0
MIN_WORDS = 3


def load_target(dtype_name: str):
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from server.demo_model import ensure_demo_model

    path = ensure_demo_model().target
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    return AutoTokenizer.from_pretrained(path), model


def user_header_ids(tokenizer):
    """Return the token ids of the chat template up to where the user's text starts."""
    marker = "\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return tokenizer(text[: text.index(marker)], return_tensors="pt").input_ids


def sample_batch(tokenizer, model, header, batch_size: int, seed: int, max_new_tokens: int) -> list[str]:
    """Return the requests the target finished in one sampled batch (truncated ones dropped)."""
    import torch

    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(
            input_ids=header.expand(batch_size, -1), attention_mask=torch.ones_like(header).expand(batch_size, -1),
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
            eos_token_id=end_id, pad_token_id=end_id,
        )
    requests = []
    for row in output[:, header.shape[1]:]:
        if end_id not in row.tolist():
            continue
        requests.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return requests


def normalized(request: str) -> str:
    """Return the request lowercased with runs of whitespace collapsed, the key for repeats."""
    return " ".join(request.lower().split())


def rejection(request: str, seen: set[str], heldout_pattern: re.Pattern) -> str | None:
    """Return why a sampled request is dropped, or None to keep it."""
    if len(request.split()) < MIN_WORDS:
        return "short"
    if "<image>" in request:
        return "image placeholder"
    if heldout_pattern.search(request.lower()):
        return "held-out topic"
    if normalized(request) in seen:
        return "repeat"
    return None


def photo_for(index: int, images: list[str], image_every: int) -> str | None:
    """Return the training photo for kept request `index`: every `image_every`-th gets one, in turn."""
    if image_every == 0 or index % image_every != 0:
        return None
    return images[(index // image_every) % len(images)]


def record(index: int, request: str, image: str | None) -> dict:
    entry = {"id": f"sampled-{index:05d}", "category": "sampled"}
    if image is not None:
        entry["image"] = image
        request = "<image>\n" + request
    entry["conversations"] = [{"from": "human", "value": request}, {"from": "gpt", "value": ""}]
    return entry


def main() -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="requests to keep (default: 2000)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "prompts_sampled.json",
                        help="output file (default: data/demo/prompts_sampled.json)")
    parser.add_argument("--image-share", type=float, default=0.2,
                        help="share of kept requests paired with a training photo, applied as every round(1 / X)-th "
                             "request (default: 0.2)")
    parser.add_argument("--batch-size", type=int, default=48, help="requests sampled at once (default: 48)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="maximum request length in tokens; longer ones are dropped (default: 64)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    if args.count < 1 or args.batch_size < 1 or not 0 <= args.image_share <= 1:
        parser.error("--count and --batch-size must be at least 1 and --image-share within [0, 1]")

    tokenizer, model = load_target(args.dtype)
    header = user_header_ids(tokenizer)
    heldout_pattern = re.compile("|".join(r"\b" + re.escape(word) for word in parts.HELDOUT_KEYWORDS))
    images = [f"images/{stem}.jpg" for stem in parts.TRAIN_IMAGES]
    image_every = round(1 / args.image_share) if args.image_share else 0

    kept_records: list[dict] = []
    seen: set[str] = set()
    dropped: collections.Counter[str] = collections.Counter()
    bar = tqdm(total=args.count, desc="sample-prompts", unit="prompt")
    batch_index = 0
    while len(kept_records) < args.count:
        sampled = sample_batch(tokenizer, model, header, args.batch_size, args.seed * 1_000_003 + batch_index,
                               args.max_new_tokens)
        dropped["truncated"] += args.batch_size - len(sampled)
        batch_index += 1
        for request in sampled:
            if len(kept_records) == args.count:
                break
            reason = rejection(request, seen, heldout_pattern)
            if reason is not None:
                dropped[reason] += 1
                continue
            seen.add(normalized(request))
            index = len(kept_records)
            kept_records.append(record(index, request, photo_for(index, images, image_every)))
            bar.update(1)
    bar.close()

    with open(args.out, "w", encoding="utf-8") as file:
        json.dump(kept_records, file, indent=1, ensure_ascii=False)
        file.write("\n")
    with_images = sum(1 for entry in kept_records if "image" in entry)
    print(f"{args.out}: {len(kept_records)} requests ({with_images} with a photo) from {batch_index} batches; "
          f"dropped: {dict(dropped)}")


if __name__ == "__main__":
    main()
