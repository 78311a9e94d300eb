"""``TrainConfig``: everything a training run needs, saved as ``train_config.json`` in the run.

Presets name whole configurations (``toile-mini`` is the shipped default model); the CLI
overrides a few fields (steps, batch size, learning rate, seed) on top of a preset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from toile.families.toile.config import ToileModelConfig, tiny_config

DEFAULT_SAMPLE_PROMPTS: tuple[str, ...] = (
    "a red circle on a blue background",
    "a large yellow square on a black background",
    "a small green triangle on white",
    "a blue square to the left of a red circle on a white background",
    "an orange circle above a purple triangle on black",
    "two white circles on a green background",
    "three red squares on a yellow background",
    "a purple triangle below a yellow circle on a blue background",
)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` is per process; the global batch is that × processes
    × ``gradient_accumulation_steps``."""

    out_dir: str = "runs/toile-mini"
    model: ToileModelConfig = field(default_factory=ToileModelConfig)
    steps: int = 2000
    batch_size: int = 32
    # Micro-batches of ``batch_size`` per optimizer step (gradients summed). Micro-batch j of
    # process r draws what process j·N + r of N·K processes would: K micro-batches on N
    # processes train like N·K processes.
    gradient_accumulation_steps: int = 1
    # Recompute activations in the backward pass (less memory, more compute, same result).
    gradient_checkpointing: bool = False
    lr: float = 5e-4
    # Linear warmup, then constant: a run stopped at any step has a usable model (the EMA
    # weights), which a decaying schedule tuned to a fixed length would not promise. Optionally
    # a linear cooldown to 0 over the last ``cooldown_steps`` ("warmup-stable-decay", Hägele et
    # al. 2024): decide the end when it is near, resume with ``--steps END --cooldown-steps N``.
    warmup_steps: int = 100
    cooldown_steps: int = 0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (teaches CFG's uncond)
    # Logit-normal t (SD3): u ~ N(mean, std²), t = sigmoid(u).
    t_mean: float = 0.0
    t_std: float = 1.0
    # EMA (diffusers EMAModel) with warmup decay 1 − (1 + step)^−power, capped at ema_decay:
    # short runs average over few steps, long runs over ~1/(1 − ema_decay) steps.
    ema_decay: float = 0.999
    ema_power: float = 2 / 3
    seed: int = 0
    # Training data: None = the procedural scene world (batches are a pure function of the
    # step); else an image-caption folder or WebDataset shards, streamed (train/stream_data.py).
    data: str | None = None
    data_buckets: bool = False  # aspect-ratio buckets for --data instead of square crops
    # Data governance for --data (toile.safety.data_filter): an opt-out list (TOML) and an
    # output check (safety-checker folder or module:callable) whose flagged images are left out.
    opt_out: str | None = None
    filter_checker: str | None = None
    scene_kinds: tuple[str, ...] = ("single", "relation", "count")
    allow_held_out: bool = False
    # "auto": bf16 on CUDA, none on CPU (bf16 autocast on CPU is slower on most CPUs).
    mixed_precision: str = "auto"
    # Shard the model state across processes (FSDP2, ``train/sharding.py``) instead of DDP's
    # replicas. No effect in one process. Checkpoints are full tensors either way.
    fsdp: bool = False
    checkpoint_every: int = 0  # steps; 0 = use checkpoint_minutes only
    checkpoint_minutes: float = 5.0  # wall-clock interval; 0 = off
    keep_checkpoints: int = 2
    # Keep the EMA weights of every Nth step under snapshots/ (never pruned, ~4 bytes per
    # parameter each): the points of a learning curve (``python -m toile.train.curve``). 0 = off.
    snapshot_every: int = 0
    sample_prompts: tuple[str, ...] = DEFAULT_SAMPLE_PROMPTS
    sample_steps: int = 20
    sample_guidance: float = 4.0
    samples_with_checkpoints: bool = True
    log_every: int = 10
    num_threads: int = 0  # torch CPU threads; 0 = leave torch's default
    resume: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "gradient_accumulation_steps": isinstance(self.gradient_accumulation_steps, int)
            and self.gradient_accumulation_steps >= 1,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "cooldown_steps": 0 <= self.cooldown_steps <= self.steps,
            "caption_dropout": 0.0 <= self.caption_dropout < 1.0,
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "snapshot_every": self.snapshot_every >= 0,
            "mixed_precision": self.mixed_precision in ("auto", "no", "bf16", "fp16"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid TrainConfig.{name}: {getattr(self, name)!r}")
        if self.fsdp and self.mixed_precision == "fp16":
            # fp16 needs accelerate's gradient scaler, which the FSDP path does not go through.
            raise ValueError("invalid TrainConfig.fsdp: FSDP trains in float32 or bf16 "
                             "(mixed_precision auto, no or bf16), not fp16")

    def with_changes(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "model" in values:
            values["model"] = ToileModelConfig.from_dict(data["model"])
        return cls(**values)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_dict(json.loads(path.read_text()))


def _toile_mini() -> TrainConfig:
    # 11.6 M-parameter U-Net on 64×64 pixels packed to 32×32×12 (see families/toile/config.py).
    return TrainConfig(model=ToileModelConfig(), batch_size=32, lr=5e-4, warmup_steps=100)


def _tiny() -> TrainConfig:
    # For tests and smoke runs: 16×16 images, a ~0.2 M-parameter U-Net.
    return TrainConfig(
        model=tiny_config(), steps=4, batch_size=4, lr=1e-3, warmup_steps=2,
        checkpoint_minutes=0.0, sample_prompts=DEFAULT_SAMPLE_PROMPTS[:2], sample_steps=2,
        progress_bar=False, log_every=1,
    )


PRESETS = {"toile-mini": _toile_mini, "tiny": _tiny}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A named configuration with field overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]().with_changes(**overrides)
