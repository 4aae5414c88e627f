"""`specvlm self-distill`: regenerate a dataset's assistant turns with the target itself.

    specvlm self-distill --data prompts.json --out train.json --image-folder /data/llava/images

A draft learns to predict the target's next tokens, so training it on the target's own
answers matches what it has to predict when serving. This command rewrites every
assistant turn with the target's greedy output, through the same engine that serves
requests.

Input and output are LLaVA-format JSON: a list of records
`{"id", "image": "relative/path" (optional; a list for several images),
"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}`.
`<image>` in a human turn marks where an image goes, and text beside it is stripped (as
LLaVA's preprocessing does); a record with an image but no `<image>` gets it prepended
to its first human turn, in the output too. Text-only ShareGPT records work too, with
`{"role", "content"}` turns and a "messages" list allowed. Every assistant turn is
regenerated, conditioned on the regenerated earlier turns, and a conversation that ends
with a human turn gets one generated assistant turn appended.

NOTE: in bfloat16 the engine's greedy output depends on which requests share a batch
(measured on CPU with the demo model), so reruns differ; float32 output did not.

A record that cannot be used (bad structure, missing image, prompt too long, engine
error on that request) is skipped, logged once with its index and counted. The output
keeps the input order and is rewritten atomically every `--save-interval` seconds, so a
killed run loses at most that much work and `--resume` continues it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
# Speaker names in LLaVA, ShareGPT and OpenAI-style turns -> chat template roles.
ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
}


class InvalidRecordError(ValueError):
    """A dataset record that cannot be turned into chat messages; the message gives the reason."""


@dataclasses.dataclass
class DistillStats:
    """Counts of one run. Tokens are the engine's completion tokens, EOS included."""

    records: int = 0  # records in the input (after --limit)
    resumed: int = 0  # records taken unchanged from an earlier output (--resume)
    generated: int = 0  # records regenerated in this run
    skipped: int = 0  # records that failed and are left out of the output
    skipped_indices: list[int] = dataclasses.field(default_factory=list)
    turns: int = 0  # assistant turns generated
    truncated_turns: int = 0  # turns that stopped at max_tokens or the context length
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class Turn:
    """One turn of a record: its chat role, its text and the images placed in it."""

    role: str  # "user", "assistant" or "system"
    text: str
    images: list = dataclasses.field(default_factory=list)


# ----- records to chat messages ---------------------------------------------------------


def turns_key(record: dict) -> str:
    """Return the key of the record's turn list: "conversations" (LLaVA, ShareGPT) or "messages"."""
    return "conversations" if "conversations" in record else "messages"


def record_image_paths(record: dict) -> list[str]:
    """Return the record's image paths ("image" may be absent, one string or a list)."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(path, str) for path in image):
        return image
    raise InvalidRecordError(f"'image' must be a string or a list of strings, not {type(image).__name__}")


def parse_turns(record: object) -> list[Turn]:
    """Return the record's turns after checking its structure. Raises InvalidRecordError.

    A turn is `{"from", "value"}` or `{"role", "content"}`. Assistant turns may have an
    empty or missing text, because it is regenerated.
    """
    if not isinstance(record, dict):
        raise InvalidRecordError(f"a record must be a JSON object, not {type(record).__name__}")
    if "id" not in record:
        raise InvalidRecordError("the record has no 'id'")
    raw_turns = record.get(turns_key(record))
    if not isinstance(raw_turns, list) or not raw_turns:
        raise InvalidRecordError("'conversations' (or 'messages') is missing or not a non-empty list")
    turns = []
    for position, raw in enumerate(raw_turns):
        speaker = raw.get("from", raw.get("role")) if isinstance(raw, dict) else None
        if speaker not in ROLES:
            raise InvalidRecordError(
                f"turn {position} needs 'from' (or 'role') set to one of {', '.join(ROLES)}, got {raw!r:.80}"
            )
        text = raw.get("value", raw.get("content"))
        if ROLES[speaker] == "assistant" and text is None:
            text = ""
        if not isinstance(text, str):
            raise InvalidRecordError(f"turn {position} has no string 'value' (or 'content')")
        if ROLES[speaker] != "user" and IMAGE_PLACEHOLDER in text:
            raise InvalidRecordError(f"turn {position} ({speaker}) contains {IMAGE_PLACEHOLDER}")
        turns.append(Turn(ROLES[speaker], text))
    if not any(turn.role == "user" for turn in turns):
        raise InvalidRecordError("the conversation has no human turn")
    return turns


def place_images(turns: list[Turn], images: list) -> None:
    """Attach the record's images to its turns by the `<image>` placeholders.

    Without any placeholder, all images go before the text of the first human turn
    (LLaVA's convention), and that turn's text gets the placeholders.
    """
    counts = [turn.text.count(IMAGE_PLACEHOLDER) for turn in turns]
    if sum(counts) == 0 and images:
        first_human = next(i for i, turn in enumerate(turns) if turn.role == "user")
        turns[first_human].text = IMAGE_PLACEHOLDER * len(images) + turns[first_human].text
        counts[first_human] = len(images)
    if sum(counts) != len(images):
        raise InvalidRecordError(
            f"the conversation has {sum(counts)} {IMAGE_PLACEHOLDER} placeholders but the record names "
            f"{len(images)} images"
        )
    start = 0
    for turn, count in zip(turns, counts):
        turn.images = images[start:start + count]
        start += count


def user_content(turn: Turn) -> str | list[dict]:
    """Split a human turn at each `<image>` into image and text parts, in order.

    Text beside a placeholder is stripped, as LLaVA's preprocessing and the draft training
    data loader do, so "<image>\nDescribe it." becomes an image part and "Describe it.".
    """
    if not turn.images:
        return turn.text
    parts: list[dict] = []
    for position, piece in enumerate(turn.text.split(IMAGE_PLACEHOLDER)):
        if position > 0:
            parts.append({"type": "image", "image": turn.images[position - 1]})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def load_record_images(record: dict, image_folder: Path) -> list:
    from server.generate import load_image_file

    return [load_image_file(image_folder / path) for path in record_image_paths(record)]


def updated_record(record: dict, turns: list[Turn]) -> dict:
    """Return a copy of the record with the turns' texts; extra keys of each turn are kept."""
    result = copy.deepcopy(record)
    key = turns_key(result)
    raw_turns = result[key]
    for raw, turn in zip(raw_turns, turns):
        raw["value" if "from" in raw else "content"] = turn.text
    if len(turns) > len(raw_turns):  # the generated reply to a final human turn
        style = raw_turns[-1]
        raw_turns.append({"from": "gpt", "value": turns[-1].text} if "from" in style
                         else {"role": "assistant", "content": turns[-1].text})
    return result


# ----- generation ----------------------------------------------------------------------


async def generate_answer(engine, request_id: str, messages: list[dict], params, stats: DistillStats) -> str:
    """Run one greedy request and return its text. Raises RuntimeError on an engine error."""
    prompt = await asyncio.to_thread(engine.prepare, messages)
    pieces, last = [], None
    async for output in engine.submit(request_id, prompt, params):
        if output.error is not None:
            raise RuntimeError(f"engine error: {output.error}")
        pieces.append(output.text)
        last = output
    stats.turns += 1
    stats.prompt_tokens += last.prompt_tokens
    stats.completion_tokens += last.completion_tokens
    if last.finish_reason == "length":
        stats.truncated_turns += 1
    return "".join(pieces)


async def distill_record(engine, index: int, record: dict, image_folder: Path, params, stats: DistillStats) -> dict:
    """Return a copy of the record whose assistant turns are the target's greedy answers.

    Raises InvalidRecordError, OSError (image), PromptError or RuntimeError (engine)
    when the record cannot be used.
    """
    turns = parse_turns(record)
    place_images(turns, await asyncio.to_thread(load_record_images, record, image_folder))
    if turns[-1].role == "user":
        turns.append(Turn("assistant", ""))

    messages: list[dict] = []
    for position, turn in enumerate(turns):
        if turn.role == "assistant":
            turn.text = await generate_answer(engine, f"distill-{index}-{position}", messages, params, stats)
            messages.append({"role": "assistant", "content": turn.text})
        elif turn.role == "user":
            messages.append({"role": "user", "content": user_content(turn)})
        else:
            messages.append({"role": "system", "content": turn.text})
    return updated_record(record, turns)


# ----- files ---------------------------------------------------------------------------


def load_dataset(path: Path) -> list:
    """Read a JSON list of records. Raises ValueError, naming the file, when it is not one."""
    with open(path, encoding="utf-8") as file:
        try:
            data = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must contain a JSON list of records, not a {type(data).__name__}")
    return data


def write_json_atomic(path: Path, data: list) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file with mode 0600, so set the mode that a plain open() would give.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(data, file, ensure_ascii=False, indent=1)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def match_done_records(records: list, done: list) -> tuple[dict[int, dict], list]:
    """Map input indices to records already in the earlier output, matched by id.

    An id that occurs k times in the input matches its first k occurrences in `done`, so
    duplicate ids resume correctly as long as the input order is unchanged. Returns the
    matches and the earlier records whose id is not in the input.
    """
    pool: dict[object, collections.deque] = collections.defaultdict(collections.deque)
    for record in done:
        if isinstance(record, dict) and "id" in record:
            pool[json.dumps(record["id"])].append(record)
    matched = {}
    for index, record in enumerate(records):
        if isinstance(record, dict) and "id" in record:
            key = json.dumps(record["id"])
            if pool.get(key):
                matched[index] = pool[key].popleft()
    unmatched = [record for queue in pool.values() for record in queue]
    return matched, unmatched


# ----- the run -------------------------------------------------------------------------


class Distiller:
    """Regenerate a list of records with bounded concurrency and periodic atomic saves."""

    def __init__(self, engine, out_path: Path, image_folder: Path, params, concurrency: int,
                 save_interval: float = 60.0, progress: bool = True):
        self.engine = engine
        self.out_path = out_path
        self.image_folder = image_folder
        self.params = params
        self.concurrency = concurrency
        self.save_interval = save_interval
        self.progress = progress
        self.stats = DistillStats()
        self.results: dict[int, dict] = {}
        self.extra_records: list = []
        self._last_save = 0.0
        self._start = 0.0

    def save(self) -> None:
        ordered = [self.results[index] for index in sorted(self.results)]
        write_json_atomic(self.out_path, ordered + self.extra_records)
        self._last_save = time.monotonic()

    def run(self, records: list, done: list | None = None) -> DistillStats:
        """Regenerate every record not in `done`, write the output and return the counts."""
        self.stats.records = len(records)
        if done:
            self.results, self.extra_records = match_done_records(records, done)
            self.stats.resumed = len(self.results)
            if self.extra_records:
                logger.warning("%d records of the earlier output have ids not in the input; they are kept at the end",
                               len(self.extra_records))
        pending = [index for index in range(len(records)) if index not in self.results]
        start = time.monotonic()
        try:
            asyncio.run(self._run_all(records, pending))
        finally:
            self.stats.seconds = time.monotonic() - start
            self.save()
        return self.stats

    async def _run_all(self, records: list, pending: list[int]) -> None:
        from tqdm import tqdm

        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in pending:
            queue.put_nowait(index)
        self._start = self._last_save = time.monotonic()
        with tqdm(total=len(pending), unit="record", desc="self-distill", disable=not self.progress,
                  dynamic_ncols=True) as bar:
            workers = [asyncio.create_task(self._worker(records, queue, bar)) for _ in range(self.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()

    async def _worker(self, records: list, queue: asyncio.Queue, bar) -> None:
        from server.engine.types import EngineError, PromptError

        while not queue.empty():
            index = queue.get_nowait()
            try:
                self.results[index] = await distill_record(
                    self.engine, index, records[index], self.image_folder, self.params, self.stats
                )
                self.stats.generated += 1
            except EngineError:
                raise  # the engine is not serving at all, so no later record can succeed
            except (InvalidRecordError, PromptError, OSError, RuntimeError) as error:
                self.stats.skipped += 1
                self.stats.skipped_indices.append(index)
                record_id = records[index].get("id") if isinstance(records[index], dict) else None
                logger.warning("skipping record %d (id %r): %s", index, record_id, error)
            rate = self.stats.completion_tokens / max(time.monotonic() - self._start, 1e-9)
            bar.update(1)
            bar.set_postfix(tokens_per_s=f"{rate:.1f}", skipped=self.stats.skipped, refresh=False)
            if time.monotonic() - self._last_save >= self.save_interval:
                self.save()


# ----- command line --------------------------------------------------------------------


def add_parser(subparsers) -> None:
    from server.cli import add_config_flags

    parser = subparsers.add_parser(
        "self-distill", help="regenerate the assistant turns of a dataset with the target", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="input dataset (LLaVA-format JSON list)")
    parser.add_argument("--out", type=Path, required=True, help="output dataset, written atomically")
    parser.add_argument("--image-folder", type=Path, default=None,
                        help="folder that the records' image paths are relative to (default: the folder of --data)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="maximum tokens generated per assistant turn (default: 512)")
    parser.add_argument("--max-num-seqs", type=int, default=8,
                        help="requests decoded at once, i.e. KV cache slots (default: 8)")
    parser.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=False,
                        help="decode with the draft (default: off)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records already in --out (matched by id) and generate only the rest")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N records of --data")
    parser.add_argument("--save-interval", type=float, default=60.0,
                        help="seconds between atomic rewrites of --out while running (default: 60)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_flags(parser, ["model", "draft", "dtype", "device", "tree_depth", "tree_top_k",
                              "tree_total_tokens", "max_model_len", "log_level"])
    parser.set_defaults(handler=run)


def check_arguments(args: argparse.Namespace) -> str | None:
    """Return an error message for invalid flag values, else None."""
    if not args.data.is_file():
        return f"--data {args.data} not found"
    if args.out.resolve() == args.data.resolve():
        return "--out must differ from --data"
    if args.out.exists() and not (args.resume or args.overwrite):
        return f"--out {args.out} exists; pass --resume to continue it or --overwrite to replace it"
    if args.max_tokens < 1:
        return f"--max-tokens must be at least 1, got {args.max_tokens}"
    if args.limit is not None and args.limit < 0:
        return f"--limit must not be negative, got {args.limit}"
    if args.save_interval <= 0:
        return f"--save-interval must be positive, got {args.save_interval}"
    return None


def run(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from server.cli import config_from_args, setup_logging
    from server.engine.engine import Engine
    from server.engine.types import EngineError, SamplingParams

    problem = check_arguments(args)
    if problem:
        print(f"specvlm self-distill: error: {problem}", file=sys.stderr)
        return 2
    # Twice the slots keeps a prepared request waiting for each slot; the engine's queue
    # limit must admit all of them. --speculative and --max-num-seqs reach the config by name.
    concurrency = 2 * args.max_num_seqs
    args.max_waiting_requests = concurrency
    config = config_from_args(args)
    setup_logging(config.log_level if args.log_level else "warning")
    try:
        records = load_dataset(args.data)
        done = load_dataset(args.out) if args.resume and args.out.exists() else None
    except (OSError, ValueError) as error:
        print(f"specvlm self-distill: error: {error}", file=sys.stderr)
        return 1
    if args.limit is not None:
        records = records[:args.limit]

    engine = Engine(config)
    try:
        engine.load()
    except (OSError, ValueError) as error:
        print(f"specvlm self-distill: error: {error}", file=sys.stderr)
        return 1
    engine.start(load=False)
    engine.wait_ready()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    distiller = Distiller(engine, args.out, args.image_folder or args.data.parent, params, concurrency,
                          args.save_interval, progress=not args.no_progress)
    # SIGTERM (kill, docker stop) exits through SystemExit, so Distiller.run saves the finished records first.
    signal.signal(signal.SIGTERM, exit_on_signal)
    try:
        with logging_redirect_tqdm():
            stats = distiller.run(records, done)
    except EngineError as error:
        print(f"specvlm self-distill: error: {error}; the records done so far are in {args.out}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        print(f"specvlm self-distill: stopped; the records done so far are in {args.out}, continue with --resume",
              file=sys.stderr)
        return 130
    finally:
        engine.shutdown()
    print(summary_line(stats, args.out), file=sys.stderr)
    return 0


def exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def summary_line(stats: DistillStats, out: Path) -> str:
    rate = stats.completion_tokens / stats.seconds if stats.seconds else 0.0
    skipped = f" (indices {stats.skipped_indices[:20]}{' ...' if stats.skipped > 20 else ''})" if stats.skipped else ""
    return (
        f"[{out}: {stats.generated} records generated, {stats.resumed} kept from the earlier output, "
        f"{stats.skipped} skipped{skipped}; {stats.turns} turns ({stats.truncated_turns} stopped at the token limit), "
        f"{stats.completion_tokens} tokens in {stats.seconds:.0f} s: {rate:.1f} tokens/s]"
    )
