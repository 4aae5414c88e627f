"""The systems that `specvlm bench` compares, and how each one decodes a prompt.

A system is a name plus settings: for this engine, overrides of `ServerConfig`; for
Hugging Face, keyword arguments of `generate`. Adding a system is one entry in
`ENGINE_SYSTEMS` or `HF_SYSTEMS`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.config import ServerConfig
from server.engine.types import PreparedPrompt, SamplingParams

logger = logging.getLogger(__name__)

BASELINE = "hf"

# Hugging Face generate on the same checkpoint; `prompt_lookup_num_tokens` is filled from --prompt-lookup-tokens.
HF_SYSTEMS: dict[str, dict] = {
    "hf": {},
    "hf-prompt-lookup": {"prompt_lookup_num_tokens": None},
}

# This engine; overrides of ServerConfig on top of the bench's own settings.
ENGINE_SYSTEMS: dict[str, dict] = {
    "plain": {"speculative": False},
    "draft": {"speculative": True, "draft_compressor": "none"},
}

COMPRESSOR_MODES = [mode for mode in typing.get_args(ServerConfig.model_fields["draft_compressor"].annotation)
                    if mode not in ("auto", "none")]


@dataclass(frozen=True)
class SystemSpec:
    name: str
    kind: str  # "hf" or "engine"
    settings: dict = field(default_factory=dict)  # generate kwargs (hf) or ServerConfig overrides (engine)
    needs_draft: bool = False


@dataclass
class RunResult:
    """Measurements of one request on one system."""

    output_tokens: int
    seconds: float  # from the call until the last token
    ttft_seconds: float  # from the call until the first output token
    steps: int | None = None  # speculative steps (draft + verify forwards), or None when not speculative
    accepted_tokens: int | None = None  # draft tokens accepted over those steps; MAL = 1 + accepted / steps


def compressor_system_name(mode: str) -> str:
    return f"draft+compressor({mode})"


def parse_compressor_modes(text: str | None, draft_path: Path | None) -> list[str]:
    """Return the compressor modes to benchmark: the given comma list, else the draft's own.

    The draft's own mode is `config.json` -> `"compressor"` -> `"mode"`; a draft without
    that key has no compressor, so there are no compressor systems. "none" in the list
    is allowed and returns no systems. Raises ValueError on an unknown mode.
    """
    if text is not None:
        modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    else:
        modes = _draft_compressor_modes(draft_path)
    unknown = [mode for mode in modes if mode not in COMPRESSOR_MODES and mode != "none"]
    if unknown:
        raise ValueError(f"unknown compressor mode {', '.join(unknown)} in --compressor-modes; "
                         f"expected a comma list of {', '.join(COMPRESSOR_MODES)}")
    return [mode for mode in dict.fromkeys(modes) if mode != "none"]


def _draft_compressor_modes(draft_path: Path | None) -> list[str]:
    if draft_path is None or not (draft_path / "config.json").is_file():
        return []
    config = json.loads((draft_path / "config.json").read_text())
    compressor = config.get("compressor")
    if isinstance(compressor, dict) and isinstance(compressor.get("mode"), str):
        return [compressor["mode"]]
    return []


def build_system_specs(compressor_modes: list[str], prompt_lookup_tokens: int,
                       only: list[str] | None = None) -> list[SystemSpec]:
    """List the systems in run order, the Hugging Face baseline first.

    `only` keeps the named systems (the baseline is always kept, because every ratio
    needs it). Raises ValueError on a name that is not a system.
    """
    specs = []
    for name, settings in HF_SYSTEMS.items():
        filled = {key: (prompt_lookup_tokens if key == "prompt_lookup_num_tokens" else value)
                  for key, value in settings.items()}
        specs.append(SystemSpec(name, "hf", filled))
    for name, overrides in ENGINE_SYSTEMS.items():
        specs.append(SystemSpec(name, "engine", dict(overrides), needs_draft=bool(overrides.get("speculative"))))
    for mode in compressor_modes:
        overrides = {"speculative": True, "draft_compressor": mode}
        specs.append(SystemSpec(compressor_system_name(mode), "engine", overrides, needs_draft=True))
    if only is None:
        return specs
    names = [spec.name for spec in specs]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ValueError(f"unknown system {', '.join(unknown)} in --systems; expected names from {', '.join(names)}")
    return [spec for spec in specs if spec.name in only or spec.name == BASELINE]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unique_tensor_bytes(modules: list[torch.nn.Module | None]) -> int:
    """Sum the bytes of the parameters and buffers of `modules`, each shared tensor once."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


class EngineSystem:
    """This engine with one slot, driven request by request from the calling thread."""

    def __init__(self, spec: SystemSpec, config: ServerConfig):
        from server.engine.engine import Engine

        self.spec = spec
        self.config = ServerConfig.model_validate({**config.model_dump(), **spec.settings, "max_num_seqs": 1})
        self.engine = Engine(self.config)
        self.engine.load()
        self.engine.start(load=False)
        self.device = self.engine.target.device
        self.loop = asyncio.new_event_loop()
        self._count = 0

    @property
    def tree_total_tokens(self) -> int:
        """Tree nodes verified per step; 1 when the engine runs without a draft."""
        decoder = self.engine.decoder
        return decoder.total_tokens if decoder.draft is not None else 1

    def model_bytes(self) -> int:
        """Bytes of the target, the draft and the preallocated KV caches."""
        target = self.engine.target
        weights = unique_tensor_bytes([target.decoder, target.vision, self.engine.decoder.draft])
        return weights + self.engine.decoder.kv_cache_bytes()

    def prepare(self, messages: list[dict]) -> PreparedPrompt:
        return self.engine.prepare(messages)

    def generate(self, prompt: PreparedPrompt, max_tokens: int, temperature: float, seed: int) -> RunResult:
        self._count += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=1.0, top_k=0,
                                seed=seed, ignore_eos=True)
        return self.loop.run_until_complete(self._collect(f"bench-{self.spec.name}-{self._count}", prompt, params))

    async def _collect(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams) -> RunResult:
        start = time.perf_counter()
        first = None
        last = None
        async for output in self.engine.submit(request_id, prompt, params):
            if output.error is not None:
                raise RuntimeError(f"system {self.spec.name}: request {request_id} failed: {output.error}")
            if first is None and output.token_ids:
                first = time.perf_counter()
            last = output
        end = time.perf_counter()
        speculative = self.engine.decoder.draft is not None
        return RunResult(
            output_tokens=last.completion_tokens,
            seconds=end - start,
            ttft_seconds=(first or end) - start,
            steps=last.spec_steps if speculative else None,
            accepted_tokens=last.spec_accepted_tokens if speculative else None,
        )

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.close()


class _StepTimer:
    """A `generate` streamer that records when the first output token arrives and counts steps.

    `generate` calls `put` once with the prompt, then once per decoding step with the
    tokens that step added (several in prompt-lookup mode).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            _synchronize(self.device)
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


class HFSystem:
    """Hugging Face `generate` on a `LlavaForConditionalGeneration` loaded from the target folder.

    Both Hugging Face systems share one loaded model; `settings` are extra `generate`
    keyword arguments. `min_new_tokens` equals `max_new_tokens`, so every run has the
    same length as this engine's runs, which ignore EOS.
    """

    def __init__(self, spec: SystemSpec, model, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.model = model
        self.device = device
        self.dtype = dtype

    @staticmethod
    def load_model(target_path: Path, device: torch.device, dtype: torch.dtype):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(target_path, dtype=dtype).to(device).eval()

    def model_bytes(self) -> int:
        return unique_tensor_bytes([self.model])

    @torch.inference_mode()
    def generate(self, prompt: PreparedPrompt, max_tokens: int, temperature: float, seed: int) -> RunResult:
        input_ids = torch.tensor([prompt.token_ids], device=self.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if prompt.pixel_values is not None:
            inputs["pixel_values"] = prompt.pixel_values.to(self.device, self.dtype)
        if temperature == 0:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        else:
            # top_k 0 and top_p 1 switch off the filters a generation_config.json may set,
            # so both engines sample from the same full distribution.
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            torch.manual_seed(seed)
        timer = _StepTimer(self.device)
        _synchronize(self.device)
        start = time.perf_counter()
        output = self.model.generate(**inputs, **sampling, **self.spec.settings, max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens, streamer=timer)
        _synchronize(self.device)
        end = time.perf_counter()
        output_tokens = output.shape[1] - input_ids.shape[1]
        lookup = "prompt_lookup_num_tokens" in self.spec.settings
        return RunResult(
            output_tokens=output_tokens,
            seconds=end - start,
            ttft_seconds=(timer.first_token_time or end) - start,
            # Every streamer call after the prompt is one target forward, the first one
            # included, and each forward adds its accepted tokens plus one of its own.
            steps=timer.calls - 1 if lookup else None,
            accepted_tokens=output_tokens - (timer.calls - 1) if lookup else None,
        )

    def close(self) -> None:
        pass
