"""Write the demo images and prompt sets used to train and evaluate the demo draft.

    python data/demo/make_prompts.py            # writes images/, prompts_train.json, prompts_heldout.json

The output is deterministic (fixed seed). Prompts are LLaVA-format records whose gpt
turns are empty; `specvlm self-distill` fills them with the target's own answers. The
images come from scikit-image's bundled sample data, so this script needs no network.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import prompt_parts as parts

SEED = 0
MAX_IMAGE_SIDE = 384
JPEG_QUALITY = 85

# Records per text category in the training set (900 in all).
TEXT_COUNTS = {
    "explain": 120, "list": 80, "poem": 30, "define": 60, "compare": 60, "story": 80, "howto": 90,
    "rewrite": 60, "grammar": 20, "math": 70, "code": 90, "letter": 40, "summary": 60, "advice": 40,
}
TEXT_FOLLOW_UP_RECORDS = 70  # training text records that get a second human turn
IMAGE_PROMPTS_PER_IMAGE = 22  # generic prompts per training image, plus its image-specific ones
IMAGE_FOLLOW_UP_RECORDS = 20
IMAGE_AFTER_TEXT_SHARE = 0.2  # share of image prompts with <image> after the question instead of before


# ----- images ---------------------------------------------------------------------------


def save_images(folder: Path) -> dict[str, int]:
    """Save every training and held-out photo as a downscaled JPEG; return file sizes in bytes."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for stem, loader in {**parts.TRAIN_IMAGES, **parts.HELDOUT_IMAGES}.items():
        image = Image.fromarray(getattr(skimage.data, loader)()).convert("RGB")
        scale = MAX_IMAGE_SIDE / max(image.size)
        if scale < 1:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        path = folder / f"{stem}.jpg"
        image.save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)
        sizes[path.name] = path.stat().st_size
    return sizes


# ----- text prompts ---------------------------------------------------------------------


def math_problems(rng: random.Random, count: int) -> list[str]:
    """Make simple arithmetic word problems with random numbers (answers are left to the model)."""
    makers = [
        lambda: (lambda a, b: f"A baker makes {a} loaves of bread every morning and sells {b} of them by noon. "
                 "How many loaves are left?")(rng.randint(30, 90), rng.randint(5, 29)),
        lambda: (lambda b, c: f"Tom has {b * c + rng.randint(0, 9)} marbles. He gives {b} to each of his {c} friends. "
                 "How many marbles does he have left?")(rng.randint(2, 8), rng.randint(2, 6)),
        lambda: f"A train travels at {rng.choice([60, 75, 80, 90, 120])} km per hour. "
                f"How far does it go in {rng.randint(2, 7)} hours?",
        lambda: f"A shirt costs ${rng.randint(12, 60)}. It is on sale for {rng.choice([10, 20, 25, 30, 50])}% off. "
                "What is the sale price?",
        lambda: f"A rectangle is {rng.randint(3, 15)} cm wide and {rng.randint(16, 40)} cm long. "
                "What are its area and perimeter?",
        lambda: f"Sara reads {rng.choice([10, 12, 15, 20, 25])} pages a day. How many days will it take her "
                f"to finish a book of {rng.choice([150, 180, 240, 300, 360])} pages?",
        lambda: f"A garden has {rng.randint(4, 12)} rows of plants with {rng.randint(5, 15)} plants in each row. "
                "How many plants are there in total?",
        lambda: f"If {rng.randint(3, 6)} apples cost ${rng.randint(2, 5)}, how much do "
                f"{rng.randint(8, 20)} apples cost?",
        lambda: f"A tank holds {rng.choice([200, 240, 300, 450])} liters of water and drains at "
                f"{rng.choice([5, 6, 10, 15])} liters per minute. How long until it is empty?",
        lambda: f"The temperature was {rng.randint(-5, 12)} degrees in the morning, rose by {rng.randint(3, 12)} "
                f"degrees by the afternoon, then fell by {rng.randint(4, 15)} degrees at night. "
                "What was the temperature at night?",
        lambda: f"A class of {rng.randint(20, 32)} students splits into groups of {rng.choice([3, 4, 5])}. "
                "How many full groups are there, and how many students are left over?",
        lambda: f"Maria saves ${rng.choice([5, 8, 10, 15])} each week. How many weeks does she need to "
                f"save ${rng.choice([120, 150, 200, 240])} for a new bike?",
    ]
    problems: list[str] = []
    while len(problems) < count:
        problem = rng.choice(parts.MATH_PREFIXES) + rng.choice(makers)()
        if problem not in problems:
            problems.append(problem)
    return problems


def text_pools(rng: random.Random) -> dict[str, list[str]]:
    """Return every candidate prompt of each text category, in a fixed order."""
    topics = parts.TOPICS
    # A language of weight w occurs w times in the pool, so sample_unique picks it w times as often.
    code = [t.format(language=language, task=task) for t in parts.CODE_TEMPLATES
            for language, weight in parts.CODE_LANGUAGES.items() for task in parts.CODE_TASKS
            for _ in range(weight)]
    code += [f"Write an SQL query that {task}." for task in parts.SQL_TASKS]
    code += [f"Write a shell command that {task}." for task in parts.SHELL_TASKS]
    code += [f"What does this code do?\n\n{snippet}" for snippet in parts.CODE_TO_EXPLAIN]
    return {
        "explain": [t.format(topic=x) for t in parts.EXPLAIN_TEMPLATES for x in topics],
        "list": [t.format(topic=x) for t in parts.LIST_TEMPLATES for x in topics],
        "poem": [t.format(topic=x) for t in parts.POEM_TEMPLATES for x in topics],
        "define": [t.format(term=x) for t in parts.DEFINE_TEMPLATES for x in parts.TERMS],
        "compare": [t.format(a=a, b=b) for t in parts.COMPARE_TEMPLATES for a, b in parts.COMPARISON_PAIRS],
        "story": [t.format(character=c, situation=s) for t in parts.STORY_TEMPLATES
                  for c in parts.STORY_CHARACTERS for s in parts.STORY_SITUATIONS],
        "howto": [t.format(task=x) for t in parts.HOWTO_TEMPLATES for x in parts.HOWTO_TASKS],
        "rewrite": [t.format(sentence=x) for t in parts.REWRITE_TEMPLATES for x in parts.SENTENCES_TO_REWRITE],
        "grammar": [t.format(sentence=x) for t in parts.GRAMMAR_TEMPLATES for x in parts.SENTENCES_WITH_ERRORS],
        "math": math_problems(rng, TEXT_COUNTS["math"]),
        "code": code,
        "letter": [t.format(recipient=r, purpose=p) for t in parts.LETTER_TEMPLATES for r, p in parts.LETTER_REQUESTS],
        "summary": [t.format(passage=x) for t in parts.SUMMARY_TEMPLATES for x in parts.PASSAGES],
        "advice": list(parts.ADVICE_REQUESTS),
    }


def sample_unique(rng: random.Random, pool: list[str], count: int) -> list[str]:
    unique = list(dict.fromkeys(pool))
    if count > len(unique):
        raise ValueError(f"only {len(unique)} distinct prompts for {count} requested")
    # Draw from the weighted pool (duplicates raise the odds) until `count` distinct prompts.
    chosen: list[str] = []
    while len(chosen) < count:
        prompt = rng.choice(pool)
        if prompt not in chosen:
            chosen.append(prompt)
    return chosen


def conversation(*human_turns: str) -> list[dict]:
    turns = []
    for text in human_turns:
        turns += [{"from": "human", "value": text}, {"from": "gpt", "value": ""}]
    return turns


def text_records(rng: random.Random) -> list[dict]:
    pools = text_pools(rng)
    records = []
    for category, count in TEXT_COUNTS.items():
        for prompt in sample_unique(rng, pools[category], count):
            records.append({"category": category, "turns": [prompt]})
    for record in rng.sample(records, TEXT_FOLLOW_UP_RECORDS):
        follow_ups = parts.CODE_FOLLOW_UPS if record["category"] == "code" else parts.FOLLOW_UPS
        record["turns"].append(rng.choice(follow_ups))
    return [{"category": r["category"], "conversations": conversation(*r["turns"])} for r in records]


# ----- image prompts --------------------------------------------------------------------


def with_image(prompt: str, after_text: bool) -> str:
    return f"{prompt}\n<image>" if after_text else f"<image>\n{prompt}"


def image_records(rng: random.Random) -> list[dict]:
    records = []
    for stem in parts.TRAIN_IMAGES:
        prompts = rng.sample(parts.IMAGE_TEMPLATES, IMAGE_PROMPTS_PER_IMAGE) + parts.IMAGE_SPECIFIC[stem]
        for prompt in prompts:
            records.append({"image": f"images/{stem}.jpg", "category": "image",
                            "turns": [with_image(prompt, rng.random() < IMAGE_AFTER_TEXT_SHARE)]})
    for record in rng.sample(records, IMAGE_FOLLOW_UP_RECORDS):
        record["turns"].append(rng.choice(parts.IMAGE_FOLLOW_UPS))
    return [{"image": r["image"], "category": r["category"], "conversations": conversation(*r["turns"])}
            for r in records]


# ----- sets and checks ------------------------------------------------------------------


def training_set(rng: random.Random) -> list[dict]:
    records = text_records(rng) + image_records(rng)
    rng.shuffle(records)  # mixes text and image prompts, so any prefix of the file is a fair sample
    return [{"id": f"train-{index:04d}", **record} for index, record in enumerate(records)]


def heldout_set() -> list[dict]:
    records = [{"id": f"heldout-text-{index:02d}", "category": "heldout-text", "conversations": conversation(prompt)}
               for index, prompt in enumerate(parts.HELDOUT_TEXT_PROMPTS)]
    for stem in parts.HELDOUT_IMAGES:
        for prompt in parts.HELDOUT_IMAGE_PROMPTS:
            records.append({"id": f"heldout-image-{len(records) - len(parts.HELDOUT_TEXT_PROMPTS):02d}",
                            "image": f"images/{stem}.jpg", "category": "heldout-image",
                            "conversations": conversation(with_image(prompt, after_text=False))})
    return records


def human_texts(records: list[dict]) -> list[str]:
    return [turn["value"] for record in records for turn in record["conversations"] if turn["from"] == "human"]


def check_separation(train: list[dict], heldout: list[dict]) -> None:
    """Raise ValueError if a held-out topic word, prompt or image also occurs in training."""
    train_text = "\n".join(human_texts(train)).lower()
    for keyword in parts.HELDOUT_KEYWORDS:
        match = re.search(r"\b" + re.escape(keyword), train_text)
        if match:
            context = train_text[max(match.start() - 40, 0):match.end() + 40]
            raise ValueError(f"held-out keyword {keyword!r} occurs in a training prompt: ...{context}...")
    overlap = set(human_texts(train)) & set(human_texts(heldout)) - set(parts.IMAGE_FOLLOW_UPS)
    if overlap:
        raise ValueError(f"prompts in both sets: {sorted(overlap)[:3]}")
    for prompt in parts.HELDOUT_IMAGE_PROMPTS:
        if prompt in parts.IMAGE_TEMPLATES or prompt in parts.IMAGE_FOLLOW_UPS:
            raise ValueError(f"held-out image prompt {prompt!r} is also a training template")
    shared_images = {r.get("image") for r in train} & {r.get("image") for r in heldout} - {None}
    if shared_images:
        raise ValueError(f"images in both sets: {sorted(shared_images)}")
    # Follow-up questions repeat on purpose; first turns must be distinct (except the same
    # question about different images).
    first_turns = [(r.get("image"), r["conversations"][0]["value"]) for r in train]
    if len(set(first_turns)) != len(first_turns):
        raise ValueError(f"{len(first_turns) - len(set(first_turns))} first turns occur twice in the training set")


def write_json(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(records, file, ensure_ascii=False, indent=1)
        file.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder (default: data/demo)")
    args = parser.parse_args()

    sizes = save_images(args.out / "images")
    rng = random.Random(SEED)
    train = training_set(rng)
    heldout = heldout_set()
    check_separation(train, heldout)
    write_json(args.out / "prompts_train.json", train)
    write_json(args.out / "prompts_heldout.json", heldout)

    for name, size in sizes.items():
        print(f"images/{name}: {size / 1024:.1f} KiB")
    for name, records in (("prompts_train.json", train), ("prompts_heldout.json", heldout)):
        with_images = sum(1 for r in records if "image" in r)
        two_turn = sum(1 for r in records if len(r["conversations"]) > 2)
        print(f"{name}: {len(records)} records ({len(records) - with_images} text, {with_images} image, "
              f"{two_turn} with two human turns)")


if __name__ == "__main__":
    main()
