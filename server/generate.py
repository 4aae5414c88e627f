"""`specvlm generate`: answer one image + prompt locally and report the decoding speed.

    specvlm generate --image photo.jpg --prompt "What is in the picture?" --temperature 0
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    from server.cli import add_config_flags

    parser = subparsers.add_parser(
        "generate", help="answer one prompt locally", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", type=Path, action="append", default=[], help="image file; repeat for several")
    parser.add_argument("--prompt", required=True, help="the user's question")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: 0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    add_config_flags(parser, ["model", "draft", "dtype", "device", "speculative", "tree_depth", "tree_top_k",
                              "tree_total_tokens", "max_model_len", "log_level"])
    parser.set_defaults(handler=run)


def load_image_file(path: Path):
    from PIL import Image, ImageOps

    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    with Image.open(path) as image:
        image.seek(0)
        return ImageOps.exif_transpose(image).convert("RGB")


def run(args: argparse.Namespace) -> int:
    from server.cli import config_from_args, setup_logging
    from server.engine.engine import Engine
    from server.engine.types import SamplingParams

    config = config_from_args(args).model_copy(update={"max_num_seqs": 1})
    setup_logging(config.log_level if args.log_level else "warning")
    try:
        images = [load_image_file(path) for path in args.image]
        engine = Engine(config)
        engine.load()
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    engine.start(load=False)
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": args.prompt}]
    prompt = engine.prepare([{"role": "user", "content": content}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)

    async def stream():
        start, first, last = time.perf_counter(), None, None
        async for output in engine.submit("generate-0", prompt, params):
            if output.error:
                raise RuntimeError(output.error)
            first = first or time.perf_counter()
            print(output.text, end="", flush=True)
            last = output
        return start, first, time.perf_counter(), last

    try:
        start, first, end, last = asyncio.run(stream())
    finally:
        engine.shutdown()
    print()
    decode_tokens = last.completion_tokens - 1
    mal = 1 + last.spec_accepted_tokens / last.spec_steps if last.spec_steps else 1.0
    print(
        f"[{last.completion_tokens} tokens in {end - start:.2f} s: {last.completion_tokens / (end - start):.1f} tokens/s; "
        f"time to first token {first - start:.2f} s; decode {decode_tokens / max(end - first, 1e-9):.1f} tokens/s; "
        f"mean accepted length {mal:.2f} over {last.spec_steps} steps; prompt {last.prompt_tokens} tokens]",
        file=sys.stderr,
    )
    return 0
