"""``FinetuneConfig``: every setting of a fine-tuning run, validated, saved with each checkpoint.

Defaults follow diffusers' DreamBooth scripts (``train_dreambooth_lora*.py``): LoRA rank 4 with
alpha = rank, learning rate 1e-4 for LoRA and 5e-6 for full fine-tuning, constant schedule,
AdamW, gradient clipping at 1.0, 100 class images with prior weight 1.0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from toile.errors import RequestError

METHODS = ("lora", "full")
PRIOR_LOSSES = ("images", "distill")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")

# Settings that must not change between a checkpoint and ``--resume``: they shape the trained
# weights, the optimizer state or the data order. ``steps`` (to train further), logging and
# checkpoint cadence may change.
RESUME_FIXED = (
    "model", "method", "rank", "lora_alpha", "lora_layers", "lr", "text_encoder_lr", "batch_size",
    "train_text_encoder", "prior_preservation", "class_prompt", "class_data", "num_class_images",
    "prior_weight", "prior_loss", "seed", "resolution", "buckets", "stream", "warmup_steps",
    "weight_decay", "grad_clip", "prompt", "gradient_accumulation_steps",
)


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. ``batch_size`` is per process; the global batch is that × processes
    × ``gradient_accumulation_steps``.

    ``None`` values are filled from the model or the method: ``resolution`` from the model's
    default size, ``lr`` 1e-4 (LoRA) or 5e-6 (full), ``lora_alpha`` = ``rank``.
    """

    images: str
    out: str
    model: str | None = None  # id or path; None = the registry's default (the built-in model)
    prompt: str | None = None  # caption of images without a .txt (the DreamBooth instance prompt)
    method: str = "lora"
    steps: int = 500
    rank: int = 4
    lora_alpha: float | None = None
    # Which denoiser layers get adapters (diffusers' ``--lora_layers``): module-name suffixes,
    # e.g. ("attn2.to_k", "attn2.to_v") for Custom Diffusion's cross-attention keys and values.
    # None = every attention projection (``lora.DENOISER_TARGETS``).
    lora_layers: tuple[str, ...] | None = None
    lr: float | None = None
    text_encoder_lr: float | None = None
    batch_size: int = 1
    # Each optimizer step sums the gradients of this many micro-batches of ``batch_size``: the
    # global batch is batch_size x processes x this, in the memory of one micro-batch.
    gradient_accumulation_steps: int = 1
    # Recompute activations in the backward pass instead of keeping them (diffusers'
    # ``enable_gradient_checkpointing``): much less memory, more compute, the same result.
    gradient_checkpointing: bool = False
    train_text_encoder: bool = False
    prior_preservation: bool = False
    class_prompt: str | None = None
    # A folder of class images (+ NAME.txt captions) to use instead of generating them: kohya's
    # regularization folder. Many prompts keep more of what the model knows than one class prompt.
    class_data: str | None = None
    num_class_images: int = 100
    prior_weight: float = 1.0
    # What the class samples are pulled towards. "images": the class images themselves
    # (DreamBooth). "distill": the base model's own prediction on the same noisy class image
    # (the LoRA's model with its adapters off) — learning without forgetting (Li & Hoiem 2016):
    # the prior term is exactly 0 until the LoRA changes what the base does on class prompts.
    prior_loss: str = "images"
    class_steps: int | None = None  # sampling steps for class images (None = model default)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    # Sample images while training (diffusers' --validation_prompt, kohya's --sample_prompts):
    # a grid of these prompts drawn by the model as trained so far at the training resolution,
    # seeds seed, seed + 1, ...
    # (the same each time, so grids show what training changed), every ``validation_every``
    # steps and at the end, in OUT.checkpoints/samples/step-N.png. 0 = at the end only.
    validation_prompts: tuple[str, ...] = ()
    validation_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    resolution: int | None = None
    buckets: bool = False  # aspect-ratio bucketing instead of centre-cropping to a square
    # Stream ``images`` instead of loading it (a folder too big for memory); WebDataset shards
    # (a .tar, a glob, a folder of .tar files) are always streamed. See ``streamed``.
    stream: bool = False
    min_image_side: int | None = None  # smaller images are skipped; None = resolution / 4
    # Data governance (toile.safety.data_filter): an opt-out list (TOML) and an output check
    # (safety-checker folder or module:callable) whose flagged images are left out.
    opt_out: str | None = None
    filter_checker: str | None = None
    warmup_steps: int = 0
    weight_decay: float | None = None  # None = 1e-4 (LoRA) / 1e-2 (full), as diffusers' scripts
    grad_clip: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, none on CPU
    # Shard the denoiser across processes (FSDP2, ``train/sharding.py``) instead of DDP's
    # replicas: full fine-tuning of models too big for one device. No effect in one process.
    fsdp: bool = False
    device: str | None = None  # for class-image generation; training follows accelerate
    threads: int = 0  # torch CPU threads; 0 = torch's default
    progress_bar: bool = True
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.lora_layers is not None:
            # JSON (a saved config) gives a list; keep one type so resume compares equal.
            object.__setattr__(self, "lora_layers", tuple(self.lora_layers))
        object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts))
        checks: dict[str, tuple[bool, str]] = {
            "images": (bool(self.images), "must name a folder of images"),
            "out": (bool(self.out), "must name the output path"),
            "method": (self.method in METHODS, f"must be one of {', '.join(METHODS)}"),
            "steps": (_int(self.steps) and self.steps >= 1, "must be an integer >= 1"),
            "rank": (_int(self.rank) and 1 <= self.rank <= 1024, "must be an integer in [1, 1024]"),
            "batch_size": (_int(self.batch_size) and self.batch_size >= 1, "must be >= 1"),
            "gradient_accumulation_steps": (
                _int(self.gradient_accumulation_steps) and self.gradient_accumulation_steps >= 1,
                "must be an integer >= 1"),
            "num_class_images": (
                _int(self.num_class_images) and self.num_class_images >= 1, "must be >= 1"
            ),
            "prior_weight": (self.prior_weight >= 0, "must be >= 0"),
            "prior_loss": (self.prior_loss in PRIOR_LOSSES,
                           f"must be one of {', '.join(PRIOR_LOSSES)}"),
            "checkpoint_every": (_int(self.checkpoint_every) and self.checkpoint_every >= 0,
                                 "must be >= 0 (0 = only at the end)"),
            "keep_checkpoints": (self.keep_checkpoints >= 1, "must be >= 1"),
            "validation_every": (_int(self.validation_every) and self.validation_every >= 0,
                                 "must be >= 0 (0 = at the end only)"),
            "validation_prompts": (
                all(isinstance(p, str) and p.strip() for p in self.validation_prompts)
                and (self.validation_prompts or not self.validation_every),
                "must be non-empty prompts (validation_every needs at least one)"),
            "seed": (_int(self.seed) and self.seed >= 0, "must be a non-negative integer"),
            "warmup_steps": (self.warmup_steps >= 0, "must be >= 0"),
            "grad_clip": (self.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
            "mixed_precision": (self.mixed_precision in MIXED_PRECISION,
                                f"must be one of {', '.join(MIXED_PRECISION)}"),
            "log_every": (self.log_every >= 1, "must be >= 1"),
        }
        if self.lora_layers is not None:
            checks["lora_layers"] = (
                bool(self.lora_layers) and all(
                    isinstance(n, str) and n.strip() == n and n for n in self.lora_layers),
                "must be a non-empty list of module names (e.g. attn2.to_k,attn2.to_v)",
            )
            if self.method != "lora":
                checks["lora_layers"] = (False, "only applies to --method lora")
        for name in ("lr", "text_encoder_lr", "lora_alpha"):
            value = getattr(self, name)
            checks[name] = (value is None or value > 0, "must be > 0")
        if self.resolution is not None:
            checks["resolution"] = (_int(self.resolution) and self.resolution >= 8, "must be >= 8")
        for name, (ok, message) in checks.items():
            if not ok:
                raise RequestError(name, f"{message}, got {getattr(self, name)!r}")
        if self.fsdp and self.train_text_encoder:
            raise RequestError("fsdp", "shards the denoiser only; train the text encoder "
                               "without --fsdp, or leave out --train-text-encoder")
        if self.fsdp and self.mixed_precision == "fp16":
            raise RequestError("fsdp", "FSDP trains in float32 or bf16 (--mixed-precision "
                               "auto, no or bf16), not fp16")
        if self.prior_preservation and not (self.class_prompt or self.class_data):
            raise RequestError(
                "class_prompt",
                "prior preservation needs --class-prompt (what the class looks like in general, "
                "e.g. 'a star on a white background') or --class-data DIR (your own class "
                "images with captions)",
            )
        if self.prior_loss == "distill" and not (self.prior_preservation
                                                 and self.method == "lora"):
            raise RequestError(
                "prior_loss", "distill needs prior preservation (--class-data or "
                "--prior-preservation) and --method lora (the base model is the LoRA's model "
                "with its adapters off)",
            )
        if self.class_data and not self.prior_preservation:
            raise RequestError(
                "class_data", "class images are only used with prior preservation; set "
                "prior_preservation (the CLI's --class-data does)",
            )
        if self.method == "lora" and Path(self.out).suffix.lower() != ".safetensors":
            raise RequestError(
                "out", f"a LoRA is saved as one .safetensors file; name it e.g. "
                f"{Path(self.out).with_suffix('.safetensors').name}, got {self.out!r}"
            )

    # ---------------------------------------------------------------- derived settings
    @property
    def streamed(self) -> bool:
        """Whether ``images`` is read as a stream (``stream``, or shards) or loaded whole."""
        from toile.train.stream_data import is_shards

        return self.stream or is_shards(self.images)

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.method == "lora" else 5e-6

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.effective_lr

    @property
    def effective_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.rank)

    @property
    def effective_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.method == "lora" else 1e-2

    @property
    def checkpoint_root(self) -> Path:
        """``OUT.checkpoints/``: periodic checkpoints and the training log."""
        return Path(str(self.out) + ".checkpoints")

    @property
    def class_images_dir(self) -> Path:
        """``OUT.class-images/``: the cached class images of prior preservation."""
        return Path(str(self.out) + ".class-images")

    def learning_rate(self, step: int, base: float) -> float:
        """Linear warmup over ``warmup_steps``, then constant; stateless so resume is exact."""
        if self.warmup_steps and step < self.warmup_steps:
            return base * (step + 1) / self.warmup_steps
        return base

    # -------------------------------------------------------------------- (de)serialise
    def with_changes(self, **changes: Any) -> FinetuneConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
        """Names of the settings that differ from a checkpoint's and forbid an exact resume."""
        mine = json.loads(json.dumps(self.to_dict()))  # tuples as the saved file has them
        # A setting newer than the checkpoint had its default then.
        defaults = {f.name: f.default for f in fields(self)}
        return [name for name in RESUME_FIXED
                if saved.get(name, defaults.get(name)) != mine.get(name)]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
