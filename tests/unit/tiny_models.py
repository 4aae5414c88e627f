"""Tiny random LLaVA and Llama checkpoints built from the real config classes.

Everything is made in code (a word-level tokenizer, a 2-layer decoder of width 64, a
1-layer SigLIP tower), so the unit tests need no download and run in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

SPECIAL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>", "<image>"]
WORDS = (
    "a an the is are was what which who where how why of in on at to and or but not this that "
    "cat dog bird red green blue sky sea tree house car picture image photo color shows there "
    "system user assistant you helpful answer question yes no one two three big small"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }} {% else %}<image> {% endif %}"
    "{% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 visual tokens per image


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def text_config(vocab_size: int, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        bos_token_id=SPECIAL_TOKENS.index("<|im_start|>"),
        pad_token_id=0,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_llava(folder: Path, seed: int = 0, init_std: float = 0.15, **text_overrides) -> Path:
    """Save a random LLaVA checkpoint with its processor into `folder` and return it."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    vision = SiglipVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config(len(tokenizer), **text_overrides),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the default init, so logits are not near-uniform
        for parameter in [*model.model.language_model.parameters(), model.lm_head.weight]:
            if parameter.dim() == 2:
                parameter.normal_(0, init_std)
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.save_pretrained(folder)
    return folder


def build_tiny_checkpoint(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny LLaVA target and an untrained draft for it under `root`; return both folders."""
    from draft_models.eagle import write_initial_draft

    target = build_tiny_llava(root / "target", seed=seed)
    write_initial_draft(target, root / "draft")
    return target, root / "draft"


def build_tiny_llama(folder: Path, seed: int = 0, **text_overrides) -> Path:
    """Save a random text-only Llama checkpoint with its tokenizer into `folder`."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    model = LlamaForCausalLM(text_config(len(tokenizer), **text_overrides)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
