"""Training checkpoints: a servable draft folder plus the state needed to resume the run.

    <out>/checkpoints/step-0001000/config.json          draft config (load_draft reads it)
                                   model.safetensors    draft weights, float32
                                   training_state.pt    optimizer, scheduler, step, data
                                                        position, RNG states of every rank

A checkpoint is written to a temporary folder and renamed into place, so a run killed
while saving leaves no half-written checkpoint that `--resume latest` could pick.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from draft_models.eagle import EagleDraft, save_draft

logger = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"
CHECKPOINTS_FOLDER = "checkpoints"


@dataclass
class RunPosition:
    """How far the run has got."""

    step: int = 0  # optimizer steps taken
    micro_batches: int = 0  # micro-batches consumed since the start, over all epochs
    skipped: dict[int, str] = field(default_factory=dict)  # training record index -> reason


def rng_state(device: torch.device) -> dict:
    """Return this process's random number generator states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_folder(out: Path, step: int) -> Path:
    return out / CHECKPOINTS_FOLDER / f"step-{step:07d}"


def save_checkpoint(
    folder: Path,
    draft: EagleDraft,
    optimizer: torch.optim.Optimizer,
    scheduler,
    position: RunPosition,
    rng_states: list[dict],
    settings: dict,
) -> None:
    """Write the draft and the training state to `folder` (replacing it if it exists)."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_draft(draft, partial)
    state = {
        "position": asdict(position),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_states": rng_states,  # one per rank
        "settings": settings,
    }
    torch.save(state, partial / STATE_NAME)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    logger.info("saved checkpoint %s (step %d)", folder, position.step)


def latest_checkpoint(out: Path) -> Path | None:
    """Return the checkpoint under `out` with the highest step, or None."""
    folders = sorted(
        path for path in (out / CHECKPOINTS_FOLDER).glob("step-*")
        if path.is_dir() and not path.name.endswith(".partial") and (path / STATE_NAME).exists()
    )
    return folders[-1] if folders else None


def resolve_resume(resume: str, out: Path) -> Path:
    """Return the checkpoint folder that `--resume` names. Raises FileNotFoundError."""
    if resume == "latest":
        folder = latest_checkpoint(out)
        if folder is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {out / CHECKPOINTS_FOLDER}")
        return folder
    folder = Path(resume)
    if not (folder / STATE_NAME).exists():
        raise FileNotFoundError(f"--resume {resume}: {folder} has no {STATE_NAME}; pass a checkpoint folder or 'latest'")
    return folder


def load_training_state(folder: Path) -> dict:
    state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
    position = state["position"]
    state["position"] = RunPosition(
        position["step"], position["micro_batches"], {int(k): v for k, v in position["skipped"].items()}
    )
    return state


def changed_settings(saved: dict, current: dict, keys: tuple[str, ...]) -> list[str]:
    """Return 'name: saved -> current' for each of `keys` whose value differs."""
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]
