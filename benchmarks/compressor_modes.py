"""Compare draft-side compressor modes on the demo model, in one run.

    python benchmarks/compressor_modes.py none=DRAFT select=DRAFT weight=DRAFT concat=DRAFT \
        [--max-tokens 64] [--control]

Each `MODE=DRAFT` pair serves that draft folder with `--draft-compressor MODE`; a draft
trained with `specvlm train-draft --compressor MODE` carries what the mode needs.

For each mode it reports the draft's visual tokens per image, MAL, tokens/s and the
draft's prefill time. That time covers fuse, compress and the draft layer over the
prompt, timed apart from the target's prefill. The prompts are a mixed set at
temperature 0: 8 held-out photo questions and 8 held-out text questions asked with a
photo attached. It also counts which primitive each image got. `--control` adds every compressor draft served with mode `none`, which
separates the effect of compression from that of the draft's own training.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from draft_models.llama_layers import AttentionMask
from server.config import ServerConfig
from server.demo_model import ensure_demo_model
from server.engine.engine import Engine
from server.engine.types import SamplingParams

DATA = Path(__file__).resolve().parent.parent / "data" / "demo"


def mixed_prompts() -> list[tuple[str, list[dict]]]:
    """Return (kind, messages): photo questions, then text questions with a photo attached."""
    heldout = json.loads((DATA / "heldout.json").read_text())
    photo = [r for r in heldout if r.get("image")][::2][:8]
    text = [r for r in heldout if not r.get("image")][:8]
    images = sorted({r["image"] for r in heldout if r.get("image")})

    def messages(record, image_file):
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        image = Image.open(DATA / image_file).convert("RGB")
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]

    return [("photo", messages(r, r["image"])) for r in photo] + [
        ("text-heavy", messages(r, images[i % len(images)])) for i, r in enumerate(text)
    ]


def run_one(engine: Engine, prompt, params: SamplingParams):
    async def collect():
        return [output async for output in engine.submit(f"bench-{time.monotonic_ns()}", prompt, params)]

    return asyncio.run(collect())[-1]


@torch.inference_mode()
def draft_prefill_seconds(engine: Engine, prompt, repeats: int = 3) -> float:
    """Return the median time of the draft's part of a prefill, on target features computed once."""
    decoder = engine.decoder
    target, draft = decoder.target, decoder.draft
    token_ids = torch.tensor(prompt.token_ids)
    embeds = target.embed_prompt(token_ids, prompt.pixel_values)[None]
    count = embeds.shape[1]
    zero = torch.zeros(1, dtype=torch.long, device=target.device)
    cache = target.decoder.make_cache(1, count)
    mask = AttentionMask.build(zero, zero, zero, AttentionMask.causal(count, target.device)[None])
    features = target.decoder(embeds, torch.arange(count, device=target.device)[None], cache, mask)
    next_embeds = torch.cat((embeds[:, 1:], embeds[:, -1:]), 1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fused = draft.fuse(next_embeds, features)
        fused, _ = decoder._compress(fused, features, token_ids, prompt.pixel_values.shape[0])
        length = fused.shape[1]
        draft_mask = AttentionMask.build(zero, zero, zero, AttentionMask.causal(length, target.device)[None])
        draft.decode_fused(fused, torch.arange(length, device=target.device)[None], decoder.draft_cache, draft_mask)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, overrides: dict, prompt_set, max_tokens: int) -> dict:
    paths = ensure_demo_model()
    engine = Engine(ServerConfig(model=str(paths.target), max_num_seqs=1, tree_total_tokens=16, **overrides))
    engine.load()
    engine.start(load=False)
    try:
        prompts = [(kind, engine.prepare(messages)) for kind, messages in prompt_set]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        run_one(engine, prompts[0][1], params)  # warm-up
        tokens = steps = accepted = draft_visual = 0
        choices = collections.Counter()
        start = time.perf_counter()
        for kind, prompt in prompts:
            last = run_one(engine, prompt, params)
            tokens += last.completion_tokens
            steps += last.spec_steps
            accepted += last.spec_accepted_tokens
            draft_visual += last.draft_visual_tokens
            choices.update(f"{kind}:{choice}" for choice in last.compressor_choices)
        seconds = time.perf_counter() - start
        prefill = [draft_prefill_seconds(engine, p) for _, p in prompts] if engine.decoder.draft else []
    finally:
        engine.shutdown()
    return {
        "system": name,
        "tokens_per_s": round(tokens / seconds, 2),
        "mal": round(1 + accepted / steps, 3) if steps else None,
        "draft_visual_tokens_per_image": round(draft_visual / len(prompts), 1),
        "draft_prefill_ms": round(1000 * statistics.median(prefill), 2) if prefill else None,
        "choices": dict(sorted(choices.items())),
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drafts", nargs="+", metavar="MODE=DRAFT")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--control", action="store_true")
    args = parser.parse_args()
    pairs = []
    for item in args.drafts:
        mode, sep, folder = item.partition("=")
        if not sep or mode not in ("none", "select", "weight", "concat"):
            parser.error(f"{item!r}: expected MODE=DRAFT_FOLDER with MODE one of none, select, weight, concat")
        pairs.append((mode, folder))
    systems = [("target alone", {"speculative": False})]
    systems += [(mode, {"draft": folder, "draft_compressor": mode}) for mode, folder in pairs]
    if args.control:
        systems += [(f"{mode} draft, mode none", {"draft": folder, "draft_compressor": "none"})
                    for mode, folder in pairs if mode != "none"]
    prompt_set = mixed_prompts()
    for name, overrides in systems:
        print(json.dumps(measure(name, overrides, prompt_set, args.max_tokens)), flush=True)


if __name__ == "__main__":
    main()
