"""The training loop of online logit distillation: teacher forward, draft loss, optimizer step.

One optimizer step takes `grad_accum` micro-batches of `batch_size` conversations per
process. For each, the frozen target runs under `torch.no_grad()` and its features and
logits are the teacher signal (nothing is stored between batches). The draft trains in
float32; the teacher runs in `--teacher-dtype`.

The data order comes from `DistributedSampler` (seeded, reshuffled each epoch, sharded
over processes; one process is a world of one). The run's position is the number of
micro-batches consumed, so a resumed run continues with the same batches, the same RNG
states and the same optimizer and scheduler state as the run it continues.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from draft_models.eagle import WEIGHTS_NAME, save_draft
from draft_models.training import checkpoint as checkpoints
from draft_models.training.components import (
    DRAFT_DTYPE,
    build_draft,
    build_optimizer,
    build_scheduler,
    clip_gradients,
)
from draft_models.training.config import TrainingConfig
from draft_models.training.data import Batch, ConversationDataset, Prompt, collate, load_records
from draft_models.training.distributed import ProcessContext, wrap_for_training, write_weights_digest
from draft_models.training.encoding import ConversationEncoder
from draft_models.training.evaluation import METRICS_NAME, drop_metrics_after, evaluate_and_record
from draft_models.training.losses import (
    UNROLL_WEIGHT,
    Teacher,
    TeacherForcedDraft,
    distillation_loss,
    draft_inputs,
    unrolled_embeds,
)

logger = logging.getLogger(__name__)

FINAL_DRAFT_FOLDER = "draft"
# Settings that must match for a resumed run to continue the same run.
RESUME_SETTINGS = ("data", "batch_size", "grad_accum", "seed", "max_length", "noise", "unroll_steps", "world_size")


@dataclass
class StepStats:
    step: int
    loss: float
    feature_loss: float
    ce_loss: float
    accuracy: float  # draft top-1 == target top-1 on counted positions, first draft step
    lr: float
    num_tokens: int  # sequence tokens (visual included) through teacher and draft, all processes
    num_positions: int  # positions counted in the loss, all processes
    seconds: float = 0.0  # wall time of the step: data, teacher, draft, optimizer
    unrolled_accuracy: list[float] = field(default_factory=list)  # the same for each unrolled step after the first


def throughput(history: list[StepStats]) -> float:
    """Return training tokens per second over the steps, evaluation and checkpoint time excluded."""
    seconds = sum(stats.seconds for stats in history)
    return sum(stats.num_tokens for stats in history) / seconds if seconds else 0.0


@dataclass
class TrainingResult:
    out: Path
    final_draft: Path
    steps: int
    history: list[StepStats] = field(default_factory=list)  # steps run by this call
    skipped: dict[int, str] = field(default_factory=dict)
    tokens_per_second: float = 0.0


class DraftTrainer:
    """Trainer of a draft for `target` with the settings in `config`; `run()` does the whole run."""

    def __init__(self, config: TrainingConfig, target, context: ProcessContext | None = None):
        self.config = config
        self.target = target
        self.context = context or ProcessContext(device=target.device)
        self.out = Path(config.out)
        if config.resume is None and (checkpoints.latest_checkpoint(self.out) or (self.out / METRICS_NAME).exists()):
            raise ValueError(
                f"{self.out} already contains a training run; pass --resume latest to continue it, or choose another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        target.decoder.requires_grad_(False)
        if target.vision is not None:
            target.vision.requires_grad_(False)

        max_length = min(config.max_length, target.max_position_embeddings)
        if max_length < config.max_length:
            logger.info("max length %d is above the target's context, using %d", config.max_length, max_length)
        self.encoder = ConversationEncoder.for_target(target, max_length)
        records = [record for path in config.data_files() for record in load_records(path)]
        self.dataset = ConversationDataset(records, self.encoder, config.image_folder, "training")
        if len(self.dataset) == 0:
            raise ValueError(f"--data {config.data} contains no records")
        self.eval_prompts = self._load_eval_prompts() if self.context.is_main else []

        self.draft = build_draft(config, target, self.context.device)
        if config.unroll_steps > 1 and self.draft.compressor is not None:
            raise ValueError(
                f"--unroll-steps {config.unroll_steps} does not support a draft with a visual compressor yet; "
                "train the compressor with --unroll-steps 1"
            )
        self.model = wrap_for_training(TeacherForcedDraft(self.draft), self.context)
        self.teacher = Teacher(target, DRAFT_DTYPE)
        self.optimizer = build_optimizer(self.draft, config)
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=self.context.world_size, rank=self.context.rank, shuffle=True, seed=config.seed
        )
        self.micro_batches_per_epoch = math.ceil(len(self.sampler) / config.batch_size)
        self.total_micro_batches = None if config.max_steps else config.epochs * self.micro_batches_per_epoch
        self.total_steps = config.max_steps or math.ceil(self.total_micro_batches / config.grad_accum)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.position = checkpoints.RunPosition()
        self._evaluated_until = 0  # steps of this run's history before this index were reported by an evaluation
        self.fill_token_id = min(target.eos_token_ids) if target.eos_token_ids else 0
        torch.manual_seed(config.seed + self.context.rank)
        if config.resume is not None:
            self._resume(checkpoints.resolve_resume(config.resume, self.out))

    # ----- setup --------------------------------------------------------------------------

    def _load_eval_prompts(self) -> list[Prompt]:
        if self.config.eval_data is None:
            return []
        dataset = ConversationDataset(load_records(self.config.eval_data), self.encoder, self.config.image_folder, "eval")
        prompts = []
        for index in range(min(self.config.eval_samples, len(dataset))):
            prompt = dataset.prompt(index)
            if prompt is not None:
                prompts.append(prompt)
        logger.info("evaluation set: %d prompts from %s (%d skipped)", len(prompts), self.config.eval_data, len(dataset.skipped))
        if not prompts:
            raise ValueError(
                f"no usable prompt among the first {self.config.eval_samples} records of --eval-data "
                f"{self.config.eval_data} (see the warnings above); fix the file or drop --eval-data"
            )
        return prompts

    def _settings(self) -> dict:
        return {**self.config.model_dump(), "world_size": self.context.world_size}

    def _resume(self, folder: Path) -> None:
        state = checkpoints.load_training_state(folder)
        changed = checkpoints.changed_settings(state["settings"], self._settings(), RESUME_SETTINGS)
        if changed:
            logger.warning("resuming %s with changed settings, so the run will differ: %s", folder, "; ".join(changed))
        self.draft.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.position = state["position"]
        self.dataset.skipped.update(self.position.skipped)
        rng_states = state["rng_states"]
        if len(rng_states) == self.context.world_size:
            checkpoints.set_rng_state(rng_states[self.context.rank], self.context.device)
        else:
            logger.warning("checkpoint has RNG states of %d processes, not %d; noise is re-seeded", len(rng_states), self.context.world_size)
        if self.context.is_main:
            drop_metrics_after(self.out, self.position.step)
        logger.info("resumed from %s at step %d", folder, self.position.step)

    # ----- data ---------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[Batch]:
        """Yield micro-batches from the current position on, epoch after epoch."""
        size = self.config.batch_size
        epoch, offset = divmod(self.position.micro_batches, self.micro_batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            for start in range(offset * size, len(indices), size):
                yield collate([self.dataset[i] for i in indices[start : start + size]], self.fill_token_id)
            epoch, offset = epoch + 1, 0

    def _group_size(self) -> int:
        if self.total_micro_batches is None:
            return self.config.grad_accum
        return min(self.config.grad_accum, self.total_micro_batches - self.position.micro_batches)

    # ----- one step -----------------------------------------------------------------------

    def _train_step(self, group: list[Batch]) -> StepStats:
        """Accumulate gradients over the micro-batches, clip, and take one optimizer step."""
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        unrolled = config.unroll_steps - 1
        weights = [UNROLL_WEIGHT**step for step in range(config.unroll_steps)]
        # Sums over the first step's counted positions of loss, feature loss, cross-entropy and
        # accuracy, then the number of positions and of tokens, then for each unrolled step its
        # accuracy sum and positions. The logged numbers are per-position means.
        totals = [0.0] * (6 + 2 * unrolled)
        for number, batch in enumerate(group):
            teacher = self.teacher(batch)
            input_embeds, features = draft_inputs(teacher, config.noise)
            last = number == len(group) - 1
            no_sync = self.context.distributed and not last
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                output, cost, later = self.model(
                    input_embeds, features, *self._compressor_inputs(batch),
                    later_embeds=unrolled_embeds(teacher, config.unroll_steps),
                )
                outputs = [output, *(later if later is not None else [])]
                step_terms = [
                    distillation_loss(
                        self.draft, step_output, teacher, self.target.decoder.logits, batch.assistant_mask,
                        config.feature_loss_weight, config.ce_loss_weight, step,
                    )
                    for step, step_output in enumerate(outputs)
                ]
                loss = sum(weight * terms.total for weight, terms in zip(weights, step_terms)) / sum(weights)
                ((loss + cost) / len(group)).backward()
            terms = step_terms[0]
            values = (loss.detach(), terms.feature, terms.cross_entropy, terms.accuracy)
            for slot, value in enumerate(values):
                totals[slot] += value.item() * terms.num_positions
            totals[4] += terms.num_positions
            totals[5] += batch.num_tokens
            for offset, later_terms in enumerate(step_terms[1:]):
                totals[6 + 2 * offset] += later_terms.accuracy.item() * later_terms.num_positions
                totals[7 + 2 * offset] += later_terms.num_positions
        clip_gradients(self.draft, config.clip, config.clip_threshold)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()

        totals = self.context.sum(totals)
        *sums, num_positions, num_tokens = totals[:6]
        means = [value / max(num_positions, 1) for value in sums]
        later_accuracy = [totals[slot] / max(totals[slot + 1], 1) for slot in range(6, len(totals), 2)]
        return StepStats(
            self.position.step + 1, *means, lr=lr, num_tokens=int(num_tokens), num_positions=int(num_positions),
            unrolled_accuracy=later_accuracy,
        )

    def _compressor_inputs(self, batch: Batch) -> tuple:
        """Return (visual rows, prompt text rows, images per row) for the compressor, or () without one."""
        if self.draft.compressor is None or self.target.image_token_id is None:
            return ()
        tokens = batch.token_ids[:, :-1].to(self.context.device)
        visual = tokens == self.target.image_token_id
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        answer = batch.assistant_mask.to(tokens.device)
        # The prompt ends where the first answer starts (the row's length when it has none).
        prompt_end = torch.where(answer.any(1), answer.float().argmax(1), torch.tensor(batch.lengths, device=tokens.device))
        prompt = (positions[None] < prompt_end[:, None]) & ~visual
        images = torch.tensor([0 if p is None else p.shape[0] for p in batch.pixel_values], device=tokens.device)
        return visual, prompt, images

    # ----- the run ------------------------------------------------------------------------

    def run(self) -> TrainingResult:
        self._log_start()
        if self.position.step == 0 and self.config.eval_every:
            self._evaluate([])  # the starting point of the MAL curve

        history: list[StepStats] = []
        stream = self._micro_batches()
        bar = tqdm(
            total=self.total_steps, initial=self.position.step, desc="train-draft", unit="step",
            disable=not self.context.is_main,
        )
        with logging_redirect_tqdm(), bar:
            while self.position.step < self.total_steps:
                started = time.monotonic()
                group = [next(stream) for _ in range(self._group_size())]
                stats = self._train_step(group)
                stats.seconds = time.monotonic() - started
                self.position.step += 1
                self.position.micro_batches += len(group)
                history.append(stats)
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{stats.accuracy:.3f}")
                self._after_step(history)
        return self._finish(history)

    def _log_start(self) -> None:
        config = self.config
        logger.info(
            "training the draft (variant %s): %d records, %d steps of %d x %d conversations on %d process(es), "
            "teacher %s on %s",
            self.draft.config.variant, len(self.dataset), self.total_steps, config.batch_size, config.grad_accum,
            self.context.world_size, self.target.dtype, self.context.device,
        )

    def _after_step(self, history: list[StepStats]) -> None:
        """Log, save and evaluate when their intervals come round; the last step is left to `_finish`."""
        config = self.config
        step = history[-1].step
        last = step == self.total_steps
        if step % config.log_every == 0 or last:
            self._log_step(history[-config.log_every :])
        if last:
            return
        if config.save_every and step % config.save_every == 0:
            self._save_checkpoint()
        if config.eval_every and step % config.eval_every == 0:
            self._evaluate(history[self._evaluated_until :])
            self._evaluated_until = len(history)

    def _finish(self, history: list[StepStats]) -> TrainingResult:
        self._save_checkpoint()
        self._evaluate(history[self._evaluated_until :])
        final = self._save_final_draft()
        write_weights_digest(self.draft, self.context)
        skipped = self._all_skipped()
        tokens_per_second = throughput(history)
        if self.context.is_main:
            logger.info(
                "finished at step %d: %.0f tokens/s of training (teacher + draft) over this run, %d records skipped, "
                "final draft in %s",
                self.position.step, tokens_per_second, len(skipped), final,
            )
        return TrainingResult(self.out, final, self.position.step, history, skipped, tokens_per_second)

    def _log_step(self, recent: list[StepStats]) -> None:
        stats = recent[-1]
        if self.context.is_main:
            unrolled = "".join(f"/{value:.3f}" for value in stats.unrolled_accuracy)
            logger.info(
                "step %d/%d: loss %.4f (feature %.4f, ce %.4f), top-1 %.3f%s, lr %.2e, %.0f tokens/s",
                stats.step, self.total_steps, stats.loss, stats.feature_loss, stats.ce_loss, stats.accuracy,
                unrolled, stats.lr, throughput(recent),
            )

    def _all_skipped(self) -> dict[int, str]:
        skipped: dict[int, str] = {}
        for part in self.context.gather(dict(self.dataset.skipped)):
            skipped.update(part)
        return skipped

    def _save_checkpoint(self) -> None:
        """Write a checkpoint from rank 0, with every rank's RNG state and skipped records."""
        rng_states = self.context.gather(checkpoints.rng_state(self.context.device))
        self.position.skipped = self._all_skipped()
        if self.context.is_main:
            folder = checkpoints.checkpoint_folder(self.out, self.position.step)
            checkpoints.save_checkpoint(
                folder, self.draft, self.optimizer, self.scheduler, self.position, rng_states, self._settings()
            )
        self.context.barrier()

    def _evaluate(self, recent: list[StepStats]) -> None:
        """Measure MAL on rank 0; `recent` are the steps since the last evaluation, whose loss is reported."""
        if self.context.is_main and self.eval_prompts:
            extra = {"step": self.position.step, "epoch": self.position.micro_batches / self.micro_batches_per_epoch}
            positions = sum(s.num_positions for s in recent)
            if positions:
                extra["train_loss"] = sum(s.loss * s.num_positions for s in recent) / positions
                extra["train_accuracy"] = sum(s.accuracy * s.num_positions for s in recent) / positions
            evaluate_and_record(self.out, self.target, self.draft, self.eval_prompts, self.config, extra)
        self.context.barrier()

    def _save_final_draft(self) -> Path:
        folder = self.out / FINAL_DRAFT_FOLDER
        if self.context.is_main:
            save_draft(self.draft, folder)
        self.context.barrier()
        return folder
