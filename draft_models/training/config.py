"""Settings of one draft training run; `specvlm train-draft` derives its flags from these fields.

Each default is written once, here. The optimiser follows SpecVLM's recipe (AdamW with
betas 0.9 and 0.95, no weight decay, no warm-up, learning rate 8e-5 for a 7B target) and
EAGLE's gradient value clipping at 0.5. The evaluation's tree depth and top-k default to
the server's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.config import ServerConfig

_SERVER_FIELDS = ServerConfig.model_fields


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Inputs and outputs
    target: str | None = Field(None, description="Target checkpoint folder. Default: the demo model (built on first use).")
    data: str = Field(
        description="Training conversations: a LLaVA or ShareGPT JSON list, or JSON lines. Several files are "
        "separated by commas, and their records are numbered in that order."
    )
    image_folder: str | None = Field(None, description="Folder that relative image paths in the data resolve against.")
    eval_data: str | None = Field(None, description="Held-out conversations for the MAL evaluation; none skips it.")
    out: str = Field(description="Output folder: checkpoints, metrics.jsonl, mal.png and the final draft.")

    # Draft
    variant: Literal["eagle", "fspad"] | None = Field(
        None, description="Draft variant; fspad = feature sampling + partial alignment. Default: eagle, or --init-from's."
    )
    feature_sampling: bool | None = Field(None, description="FSPAD feature sampling on or off (overrides --variant).")
    partial_alignment: bool | None = Field(None, description="FSPAD partial alignment on or off (overrides --variant).")
    init_from: str | None = Field(None, description="Start from this draft checkpoint instead of a new draft.")
    # Random by default. On the demo target (SmolLM2-135M), 40 steps on 12 text conversations
    # (same seed, CPU) ended at loss 5.19 with a copy of the last layer and 1.38 with a random
    # init, and at MAL 1.01 against 1.30 on 4 held-out prompts. The copied layer expects the
    # large residual stream of a deep model rather than the fused input, and the draft's output
    # gets no final norm.
    init_layer: Literal["last", "none"] = Field(
        "none", description="Copy this target layer into a new draft's decoder layer (none: random init)."
    )

    # Visual compressor (trained jointly with the draft)
    compressor: Literal["select", "weight", "concat"] | None = Field(
        None, description="Train a draft-side visual compressor in this mode. Default: none, or --init-from's."
    )
    compressor_cost_weight: float = Field(
        0.1, ge=0, description="select mode: weight of the penalty on the share of visual tokens the draft keeps."
    )

    # Loss
    feature_loss_weight: float = Field(1.0, ge=0, description="Weight of the SmoothL1 feature loss.")
    ce_loss_weight: float = Field(0.1, ge=0, description="Weight of the soft cross-entropy against the target's logits.")
    noise: bool = Field(True, description="Add EAGLE's uniform noise to the input features.")
    unroll_steps: int = Field(
        1, ge=1, le=8,
        description="Draft steps trained per position. With 1 the draft reads target features only, and k > 1 "
        "also trains k - 1 steps on the draft's own predicted features, as drafting runs them (training-time "
        "test). Costs about k(k + 1) / 2 draft passes per batch.",
    )
    max_length: int = Field(2048, ge=8, description="Tokens per conversation (visual tokens included); longer ones are cut.")

    # Optimisation
    lr: float = Field(8e-5, gt=0, description="Peak learning rate of AdamW (betas 0.9, 0.95).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after the warm-up, to 0 at the last step."
    )
    clip: Literal["value", "norm", "none"] = Field("value", description="Gradient clipping: by value, by global norm, or none.")
    clip_threshold: float = Field(0.5, gt=0, description="Clipping threshold (value or norm).")
    batch_size: int = Field(4, ge=1, description="Conversations per micro-batch, per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training data (ignored when --max-steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides --epochs.")
    seed: int = Field(0, description="Seed of the draft initialisation, the data order and the noise.")

    # Runtime
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the frozen target; auto picks bfloat16 where the device supports it."
    )
    device: str = Field("auto", description="torch device, e.g. cpu or cuda:0; auto picks cuda when available.")
    log_every: int = Field(10, ge=1, description="Optimizer steps between log lines.")
    save_every: int = Field(1000, ge=0, description="Optimizer steps between checkpoints; 0 saves at the end only.")
    resume: str | None = Field(
        None, description="Continue a run: a checkpoint folder, or 'latest' for the newest one under --out."
    )

    # Evaluation
    eval_every: int = Field(500, ge=0, description="Optimizer steps between MAL evaluations; 0 evaluates at the end only.")
    eval_samples: int = Field(20, ge=1, description="Records of --eval-data to evaluate (the first ones).")
    eval_max_tokens: int = Field(128, ge=1, description="Tokens generated per evaluation prompt.")
    tree_depth: int = Field(_SERVER_FIELDS["tree_depth"].default, ge=1, le=16, description="Draft levels per step in evaluation.")
    tree_top_k: int = Field(_SERVER_FIELDS["tree_top_k"].default, ge=1, le=32, description="Draft tree top-k in evaluation.")
    # Fixed rather than measured per device as the server may do, so that MAL values of one
    # run, and of runs on different machines, compare.
    tree_total_tokens: int = Field(16, ge=2, le=256, description="Tree nodes verified per step in evaluation.")

    @model_validator(mode="after")
    def _check_variant(self) -> "TrainingConfig":
        if self.init_from is not None and (self.variant or self.feature_sampling is not None or self.partial_alignment is not None):
            raise ValueError("--init-from takes the variant from the checkpoint; drop --variant and the FSPAD flags")
        return self

    def data_files(self) -> list[str]:
        """Return the --data files in order."""
        return [path.strip() for path in self.data.split(",") if path.strip()]

    def draft_variant(self) -> tuple[bool, bool]:
        """Return (feature_sampling, partial_alignment) for a new draft."""
        fspad = self.variant == "fspad"
        feature_sampling = fspad if self.feature_sampling is None else self.feature_sampling
        partial_alignment = fspad if self.partial_alignment is None else self.partial_alignment
        return feature_sampling, partial_alignment
