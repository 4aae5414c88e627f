"""`specvlm bench`: side-by-side decoding speed, or serving load against a running server.

    specvlm bench --quick                         # a few minutes on CPU, the demo model
    specvlm bench --device cuda --model ./llava-1.5-7b-hf --draft ./llava-draft
    specvlm bench --load --url http://127.0.0.1:8000 --concurrency 1,2,4,8,16

Without --load it loads the systems to compare on the same checkpoint: Hugging Face
`generate` (plain and prompt lookup) and this engine (without a draft, with the draft,
and with each draft compressor mode). Then it runs them interleaved on the same prompts
at each temperature.
Results go to OUT/results.json, OUT/results.md and OUT/chart.png.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

logger = logging.getLogger(__name__)

# --quick and full values for the flags that have no explicit value.
PRESETS = {
    "num_prompts": (4, 12),
    "max_tokens": (32, 64),
    "repeats": (2, 3),
    "concurrency": ("1,2,4", "1,2,4,8,16"),
    "num_requests": (6, 32),
}
CONFIG_FLAGS = ["model", "draft", "dtype", "device", "tree_depth", "tree_top_k", "tree_total_tokens",
                "max_model_len", "draft_visual_budget", "log_level"]


def add_parser(subparsers) -> None:
    from server.cli import add_config_flags

    parser = subparsers.add_parser(
        "bench", help="measure decoding speed side by side, or load a running server", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="small run for a CPU: 4 prompts, 32 tokens, 2 repeats (load: N=1,2,4, 6 requests each)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: bench-results/<offline|load>-<local time>)")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="LLaVA-format JSON with the prompts (default: data/demo/heldout.json)")
    parser.add_argument("--image-folder", type=Path, default=None,
                        help="folder that image paths in --prompts are relative to (default: the file's folder)")
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts to use (default: 12, quick 4)")
    parser.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default: 64, quick 32)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    offline = parser.add_argument_group("side-by-side run (without --load)")
    offline.add_argument("--repeats", type=int, default=None, help="timed passes over the prompts (default: 3, quick 2)")
    offline.add_argument("--temperatures", default="0,1", help="comma list of temperatures (default: 0,1)")
    offline.add_argument("--systems", default=None,
                         help="comma list of systems to run (default: all). hf is the baseline and always runs. "
                              "Names: hf, hf-prompt-lookup, plain, draft, draft+compressor(MODE)")
    offline.add_argument("--compressor-modes", default=None,
                         help="comma list of draft compressor modes, each adding a system draft+compressor(MODE) "
                              "(default: the mode in the draft's config.json, else none)")
    offline.add_argument("--prompt-lookup-tokens", type=int, default=10,
                         help="prompt_lookup_num_tokens of the hf-prompt-lookup system (default: 10)")
    offline.add_argument("--seed", type=int, default=0, help="base seed of the sampled runs (default: 0)")
    add_config_flags(offline, CONFIG_FLAGS)

    load = parser.add_argument_group("load mode (--load)")
    load.add_argument("--load", action="store_true", help="send streaming requests to a running server instead")
    load.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: http://127.0.0.1:8000)")
    load.add_argument("--concurrency", default=None,
                      help="comma list of concurrent client counts (default: 1,2,4,8,16, quick 1,2,4)")
    load.add_argument("--num-requests", type=int, default=None,
                      help="requests per concurrency level (default: 32, quick 6)")
    load.add_argument("--max-duration", type=float, default=300.0,
                      help="seconds per level after which no new request starts (default: 300)")
    load.add_argument("--temperature", type=float, default=0.0, help="temperature of the requests (default: 0)")
    load.add_argument("--served-model-name", default=None,
                      help="model id sent in requests (default: the first of GET /v1/models)")
    load.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY' (default: none)")
    parser.set_defaults(handler=run)


def _preset(args: argparse.Namespace, name: str):
    value = getattr(args, name)
    if value is not None:
        return value
    quick, full = PRESETS[name]
    return quick if args.quick else full


def _parse_list(text: str, flag: str, convert, minimum: float) -> list:
    try:
        values = [convert(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"invalid {flag} {text!r}; expected a comma list of numbers, e.g. 0,1") from None
    if not values or any(value < minimum for value in values):
        raise ValueError(f"invalid {flag} {text!r}; every value must be at least {minimum:g}")
    return values


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"invalid --{name.replace('_', '-')} {value}; it must be at least 1")


def run(args: argparse.Namespace) -> int:
    from server.cli import setup_logging

    setup_logging(args.log_level or "warning")
    kind = "load" if args.load else "offline"
    out = args.out or Path("bench-results") / f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        result = _run_load(args) if args.load else _run_offline(args)
    except (ValueError, FileNotFoundError, ConnectionError) as error:
        print(f"specvlm bench: error: {error}", file=sys.stderr)
        return 2
    from server.bench.report import write_report

    paths = write_report(result, out)
    print((out / "results.md").read_text())
    print("wrote " + ", ".join(str(path) for path in paths), file=sys.stderr)
    return 0


def _run_offline(args: argparse.Namespace) -> dict:
    from server.bench.offline import OfflineSettings, close_systems, load_systems, run_offline
    from server.bench.prompts import DEFAULT_PROMPTS, load_prompts
    from server.bench.report import environment
    from server.bench.systems import build_system_specs, parse_compressor_modes
    from server.cli import config_from_args
    from server.engine.loading import resolve_paths
    from server.engine.target import resolve_device, resolve_dtype

    settings = OfflineSettings(
        max_tokens=_preset(args, "max_tokens"),
        repeats=_preset(args, "repeats"),
        temperatures=_parse_list(args.temperatures, "--temperatures", float, 0.0),
        seed=args.seed,
    )
    num_prompts = _preset(args, "num_prompts")
    _check_positive(max_tokens=settings.max_tokens, repeats=settings.repeats, num_prompts=num_prompts,
                    prompt_lookup_tokens=args.prompt_lookup_tokens)
    config = config_from_args(args)
    prompts = load_prompts(args.prompts, args.image_folder, num_prompts)
    _, draft_path, _ = resolve_paths(config)
    modes = parse_compressor_modes(args.compressor_modes, draft_path)
    only = [name.strip() for name in args.systems.split(",")] if args.systems else None
    specs = build_system_specs(modes, args.prompt_lookup_tokens, only)

    systems = load_systems(specs, config)
    try:
        measured = run_offline(systems, prompts, settings, progress=not args.no_progress)
    finally:
        close_systems(systems)
    device = resolve_device(config.device)
    return {
        "kind": "offline",
        **environment(),
        "settings": {
            "model": config.model or "demo", "draft": str(draft_path) if draft_path else None,
            "device": str(device), "dtype": str(resolve_dtype(config.dtype, device)).removeprefix("torch."),
            "prompts_file": str(args.prompts or DEFAULT_PROMPTS.relative_to(DEFAULT_PROMPTS.parents[2])),
            "num_prompts": len(prompts), "num_image_prompts": sum(bool(p.images) for p in prompts),
            "max_tokens": settings.max_tokens, "repeats": settings.repeats, "temperatures": settings.temperatures,
            "seed": settings.seed, "prompt_lookup_tokens": args.prompt_lookup_tokens,
            "tree_depth": config.tree_depth, "tree_top_k": config.tree_top_k,
        },
        **measured,
    }


def _run_load(args: argparse.Namespace) -> dict:
    from urllib.parse import urlparse

    try:
        from server.bench.load import LoadSettings, run_load
    except ImportError as error:
        raise ValueError(f"load mode needs httpx ({error}); install it with pip install 'specvlm[bench]'") from None
    from server.bench.prompts import DEFAULT_PROMPTS, load_prompts
    from server.bench.report import environment

    parsed = urlparse(args.url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"invalid --url {args.url!r}; expected a base URL such as http://127.0.0.1:8000")
    settings = LoadSettings(
        url=args.url.rstrip("/"),
        concurrency=_parse_list(_preset(args, "concurrency"), "--concurrency", int, 1),
        num_requests=_preset(args, "num_requests"),
        max_seconds=args.max_duration,
        max_tokens=_preset(args, "max_tokens"),
        temperature=args.temperature,
        model=args.served_model_name,
        api_key=args.api_key,
    )
    _check_positive(num_requests=settings.num_requests, max_tokens=settings.max_tokens)
    if settings.max_seconds <= 0:
        raise ValueError(f"invalid --max-duration {settings.max_seconds:g}; it must be more than 0 seconds")
    prompts = load_prompts(args.prompts, args.image_folder, _preset(args, "num_prompts"))
    measured = run_load(prompts, settings, progress=not args.no_progress)
    return {
        "kind": "load",
        **environment(),
        "settings": {
            "url": settings.url, "concurrency": settings.concurrency, "num_requests": settings.num_requests,
            "max_seconds": settings.max_seconds, "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "prompts_file": str(args.prompts or DEFAULT_PROMPTS.relative_to(DEFAULT_PROMPTS.parents[2])),
            "num_prompts": len(prompts),
        },
        **measured,
    }
