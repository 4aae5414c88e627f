"""Speed of this engine against Hugging Face on a random-weight model shaped like LLaVA-1.5-7B.

    python benchmarks/gpu_llava7b.py --out bench-results/gpu          # a CUDA GPU, a few minutes
    python benchmarks/gpu_llava7b.py --tiny --device cpu --out /tmp/t  # the same steps, tiny shapes

It builds a LLaVA checkpoint with the sizes of llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14
at 336 px, a 2-layer MLP projector and a Llama-2-7B-shaped language model), filled with
random weights and saved in bfloat16, so nothing is downloaded. The tokenizer is a
word-level one made in code. Then it measures
1. plain decoding tokens/s and time to first token: Hugging Face `generate` against
   this engine without a draft, interleaved on the same prompts (`specvlm bench`'s
   runner), with EOS ignored so every run has the same length;
2. verify cost against tree size: one target forward over 1, 2, 4, ..., 64 tree tokens
   after a fixed context, fastest of several timed calls.
Acceptance on random weights means nothing, so it reports speeds only. The checkpoint
takes about 14 GB on disk and, with both models loaded, about 30 GB of GPU memory.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.bench.offline import OfflineSettings, close_systems, run_offline  # noqa: E402
from server.bench.prompts import BenchPrompt  # noqa: E402
from server.bench.report import environment, write_report  # noqa: E402
from server.bench.systems import EngineSystem, HFSystem, SystemSpec  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engine.tree_size import verify_seconds  # noqa: E402

logger = logging.getLogger("gpu_llava7b")

# Sizes of llava-hf/llava-1.5-7b-hf (its config.json), and a tiny stand-in for CPU runs.
FULL_SHAPE = {
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768),
    "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
}
TINY_SHAPE = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=56, patch_size=14, projection_dim=32),
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-5),
}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }} {% else %}<image> {% endif %}"
    "{% endfor %}{% endif %} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
TREE_SIZES = [1, 2, 4, 8, 16, 32, 64]


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with one word per id, so any sampled id decodes."""
    words = [f"w{index}" for index in range(vocab_size - len(SPECIAL_TOKENS) - 1 - 2)]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words + ["user:", "assistant:"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def llava_config(shape: dict, image_token_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(**shape["vision"])
    text = LlamaConfig(**shape["text"], bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", image_seq_length=(vision.image_size // vision.patch_size) ** 2)


def build_checkpoint(folder: Path, shape: dict, device: torch.device) -> LlavaForConditionalGeneration:
    """Save a random bfloat16 LLaVA checkpoint with its processor to `folder`; return the model."""
    tokenizer = make_tokenizer(shape["text"]["vocab_size"])
    config = llava_config(shape, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    vision = config.vision_config
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bfloat16: a float32 7B model would need 28 GB
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": vision.image_size},
                                           crop_size={"height": vision.image_size, "width": vision.image_size}),
        tokenizer=tokenizer, patch_size=vision.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.save_pretrained(folder)
    return model


def make_prompts(image_size: int, words: int) -> list[BenchPrompt]:
    """Build one text prompt and one image prompt of fixed length from the tokenizer's words."""
    text = " ".join(f"w{3 + index % 97}" for index in range(words))
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (image_size, image_size, 3), generator=generator, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels)
    return [
        BenchPrompt("text", [{"role": "user", "content": text}]),
        BenchPrompt("image", [{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": text}]}], [image]),
    ]


def verify_table(system: EngineSystem, context: int) -> list[dict]:
    """Time the target verify forward at each tree size, and its cost relative to 1 token."""
    seconds = verify_seconds(system.engine.decoder, TREE_SIZES, context=context)
    return [{"tree_tokens": size, "seconds": seconds[size], "relative_to_1": seconds[size] / seconds[1]}
            for size in TREE_SIZES]


def verify_markdown(rows: list[dict], context: int) -> str:
    lines = ["", f"### Verify cost against tree size (target forward after {context} cached positions)", "",
             "| tree tokens | ms | relative to 1 token |", "|---|---|---|"]
    lines += [f"| {row['tree_tokens']} | {row['seconds'] * 1000:.2f} | {row['relative_to_1']:.2f}x |" for row in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder for results.json, results.md, chart.png")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes instead of the 7B ones, to check the script on CPU")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the prompts (default: 3)")
    parser.add_argument("--prompt-words", type=int, default=64, help="words in each prompt's text (default: 64)")
    parser.add_argument("--context", type=int, default=1024,
                        help="cached positions before the timed verify forwards (default: 1024)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where to save the random checkpoint (default: a temporary folder, removed after)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU; pass --device cpu --tiny to check the script",
              file=sys.stderr)
        return 2
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as scratch:
        target_folder = Path(scratch) / "llava-1.5-7b-shape"
        logger.info("building a random checkpoint in %s", target_folder)
        hf_model = build_checkpoint(target_folder, shape, device)
        config = ServerConfig(model=str(target_folder), dtype="bfloat16", device=str(device),
                              max_model_len=min(2048, shape["text"]["max_position_embeddings"]))
        systems = [
            HFSystem(SystemSpec("hf", "hf"), hf_model, device, torch.bfloat16),
            EngineSystem(SystemSpec("plain", "engine", {"speculative": False}), config),
        ]
        prompts = make_prompts(shape["vision"]["image_size"], args.prompt_words)
        settings = OfflineSettings(max_tokens=args.max_tokens, repeats=args.repeats, temperatures=[0.0])
        try:
            measured = run_offline(systems, prompts, settings)
            context = min(args.context, config.max_model_len - max(TREE_SIZES))
            verify = verify_table(systems[1], context)
        finally:
            close_systems(systems)

    result = {
        "kind": "offline",
        **environment(),
        "note": "random weights shaped like LLaVA-1.5-7B" + (" (tiny shapes)" if args.tiny else "")
                + "; acceptance means nothing here, so only speeds are reported",
        "settings": {"model": "random LLaVA-1.5-7B shape" + (" (tiny)" if args.tiny else ""), "draft": None,
                     "device": str(device), "dtype": "bfloat16", "prompts_file": "synthetic (1 text, 1 image)",
                     "num_prompts": len(prompts), "num_image_prompts": 1, "max_tokens": args.max_tokens,
                     "repeats": args.repeats, "temperatures": [0.0], "shape": shape},
        **measured,
        "verify_context": context,
        "verify": verify,
    }
    result["command"] = " ".join(["python", "benchmarks/gpu_llava7b.py", *(argv if argv is not None else sys.argv[1:])])
    write_report(result, args.out)
    with open(args.out / "results.md", "a") as markdown:
        markdown.write(f"Note: {result['note']}.\n")
        markdown.write(verify_markdown(verify, context))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
