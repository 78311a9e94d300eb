"""Train toile's super-resolution stage (4×, image + prompt conditioned) on scene-world renders.

    python -m toile.train.sr_train --out runs/sr --steps 3000 [--resume]
        [--export src/toile/assets/toile-sr]

It needs no base model: each example is a render at 256 or 512 px, a random crop of it, and
that crop box-filtered down 4× (how the renderer itself makes its small images) with Gaussian
noise of a random level added — IF's noise augmentation, the level a condition of the network,
so generated (imperfect) 64² images can be treated as slightly noisy renders. Prompts are the
scenes' captions, dropped 20 % of the time so the stage also works without one.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from toile.data.scenes import caption, render, sample_scene
from toile.families.toile.sr_model import CONFIG_FILE, WEIGHTS_FILE
from toile.families.toile.sr_net import SRNet, SRNetConfig
from toile.train.small_run import RunFolder, train_loop, warmup_cosine, write_model_folder


@dataclass(frozen=True)
class SRTrainConfig:
    out: str
    steps: int = 3000
    batch_size: int = 32
    crop: int = 24  # low-resolution crop side; the target is crop * factor
    lr: float = 5e-4
    warmup: int = 100
    cooldown: float = 0.2
    seed: int = 0
    max_noise: float = 0.08  # noise-augmentation std, in [-1, 1] pixel units
    text_dropout: float = 0.2
    channels: int = 48
    blocks: int = 6
    threads: int = 1
    checkpoint_minutes: float = 5.0


def to_tensor(image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1]."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return array.permute(2, 0, 1) / 127.5 - 1.0


def make_batch(config: SRTrainConfig, step: int,
               factor: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """``(low [B,3,c,c] noisy, level [B], high [B,3,4c,4c], prompts)`` for ``step``."""
    rng = random.Random(f"sr-{config.seed}-{step}")
    lows, highs, levels, prompts = [], [], [], []
    side = config.crop * factor
    for _ in range(config.batch_size):
        scene = sample_scene(rng, allow_held_out=True)
        size = rng.choice((256, 256, 512))
        image = render(scene, size, rng)
        left = rng.randrange(0, (size - side) // factor + 1) * factor
        top = rng.randrange(0, (size - side) // factor + 1) * factor
        crop = image.crop((left, top, left + side, top + side))
        high = to_tensor(crop)
        low = to_tensor(crop.reduce(factor))
        level = rng.uniform(0.0, config.max_noise) if rng.random() < 0.8 else 0.0
        noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(
            rng.getrandbits(32)))
        lows.append(low + level * noise)
        highs.append(high)
        levels.append(level)
        prompts.append("" if rng.random() < config.text_dropout else caption(scene, rng))
    return torch.stack(lows), torch.tensor(levels), torch.stack(highs), prompts


def pooled_prompts(encoder, prompts: list[str]) -> torch.Tensor:
    """[B, 384] pooled prompt embeddings; zeros for empty prompts (the "no prompt" input)."""
    pooled = encoder.encode(prompts).pooled.float()
    keep = torch.tensor([bool(p.strip()) for p in prompts], dtype=pooled.dtype)[:, None]
    return pooled * keep


def text_encoder():
    from toile.families.toile.config import TextEncoderConfig
    from toile.families.toile.text import TextEncoder

    return TextEncoder(TextEncoderConfig())


def train(config: SRTrainConfig, resume: bool, progress: bool,
          export_only: bool = False) -> tuple[SRNet, int, float]:
    run = RunFolder(Path(config.out))
    torch.manual_seed(config.seed)
    net = SRNet(SRNetConfig(channels=config.channels, blocks=config.blocks))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    step, seconds = 0, 0.0
    found = run.latest_state() if resume else None
    if found is not None:
        checkpoint, state = found
        net = SRNet(SRNetConfig.from_json(state["net"]))
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
        run.load(checkpoint, net, optimizer)
        step, seconds = int(state["step"]), float(state["train_seconds"])
        print(f"resumed at step {step}", file=sys.stderr)
    if export_only:
        if found is None:
            raise SystemExit("--export-only needs a run with a checkpoint (and --resume)")
        return net, step, seconds
    encoder = text_encoder()

    def loss_at(at: int) -> torch.Tensor:
        low, level, high, prompts = make_batch(config, at, net.config.factor)
        return F.l1_loss(net(low, pooled_prompts(encoder, prompts), level), high)

    step, seconds = train_loop(
        run, net, optimizer, start=step, steps=config.steps,
        lr_at=lambda at: warmup_cosine(at, config.steps, config.lr, config.warmup,
                                       config.cooldown),
        loss_at=loss_at,
        state=lambda at, secs: {"train_seconds": secs, "config": asdict(config),
                                "net": net.config.to_json()},
        seconds=seconds, checkpoint_minutes=config.checkpoint_minutes, progress=progress,
        desc="train sr")
    return net, step, seconds


def write_sr_folder(net: SRNet, folder: Path, training: dict, text=None) -> None:
    """float16 weights and ``toile_sr.json`` (network config, text encoder — ``text``, a
    ``TextEncoderConfig``, default MiniLM — and how it was trained)."""
    from toile.families.toile.config import TextEncoderConfig

    meta = {"net": net.config.to_json(), "text": asdict(text or TextEncoderConfig()),
            "noise_level": 0.0, "training": training}
    write_model_folder(folder, net, WEIGHTS_FILE, CONFIG_FILE, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toile.train.sr_train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--export", type=Path, default=None)
    parser.add_argument("--export-only", action="store_true",
                        help="export the run's latest checkpoint without training")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = SRTrainConfig(out=args.out, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, seed=args.seed, threads=args.threads,
                           checkpoint_minutes=args.checkpoint_minutes)
    net, step, seconds = train(config, args.resume or args.export_only, not args.no_progress,
                               export_only=args.export_only)
    if args.export:
        command = " ".join(["python -m toile.train.sr_train",
                            *(argv if argv is not None else sys.argv[1:])])
        write_sr_folder(net, args.export, {"steps": step, "train_minutes": round(seconds / 60, 1),
                                           "config": asdict(config), "command": command})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
