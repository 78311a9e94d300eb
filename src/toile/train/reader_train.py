"""Train toile's reader (captions and answers) on the scene world, from scratch or resumed.

    python -m toile.train.reader_train --out runs/reader --steps 4000 [--resume]
        [--encoder conv|patch] [--export src/toile/assets/toile-reader]

Every batch is drawn fresh from :mod:`toile.data.varied_render` (other renderers' variety:
hues, canvas sizes, edges, noise) and :mod:`toile.data.reader_text` (captions and ``train``
phrasing questions), deterministically from ``(seed, step)``, so a resumed run sees exactly
the batches an uninterrupted one would. Checkpoints hold no pickle (safetensors + JSON).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from toile.data.reader_text import (
    CAPTION_PROMPT,
    LONG_CAPTION_PROMPT,
    long_caption,
    sample_qa,
    short_caption,
)
from toile.data.varied_render import varied_picture
from toile.families.toile.reader_model import (
    BOS,
    CONFIG_FILE,
    EOS,
    PAD,
    SEP,
    TOKENIZER_FILE,
    UNK,
    WEIGHTS_FILE,
    build_tokenizer,
    prepare_image,
)
from toile.families.toile.reader_net import EncoderKind, ReaderNet, ReaderNetConfig
from toile.train.small_run import RunFolder, train_loop, warmup_cosine, write_model_folder


@dataclass(frozen=True)
class ReaderTrainConfig:
    out: str
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    cooldown: float = 0.2  # fraction of the steps spent decaying to 0 (cosine)
    seed: int = 0
    encoder: str = "conv"
    width: int = 128
    threads: int = 1
    checkpoint_minutes: float = 5.0
    short_share: float = 0.25  # of each batch: short captions
    long_share: float = 0.10  # long captions; the rest are questions
    word_dropout: float = 0.08  # question words read as [UNK], for unseen wording


def learning_rate(step: int, config: ReaderTrainConfig) -> float:
    return warmup_cosine(step, config.steps, config.lr, config.warmup, config.cooldown)


def make_batch(config: ReaderTrainConfig, step: int, tokenizer, side: int,
               max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pixels [B,3,S,S], tokens [B,T], targets [B,T])``: ``tokens`` is ``[BOS] prompt [SEP]
    text``, ``targets`` the next word at each position (PAD where no loss is taken)."""
    rng = random.Random(f"reader-{config.seed}-{step}")
    images, rows, targets = [], [], []
    for _ in range(config.batch_size):
        picture = varied_picture(rng)
        draw = rng.random()
        if draw < config.short_share:
            prompt, text = CAPTION_PROMPT, short_caption(picture.scene)
            prompt_ids = tokenizer.encode(prompt).ids
        elif draw < config.short_share + config.long_share:
            prompt, text = LONG_CAPTION_PROMPT, long_caption(picture.scene, picture.placements)
            prompt_ids = tokenizer.encode(prompt).ids
        else:
            qa = sample_qa(picture.scene, picture.placements, rng)
            text = qa.answer
            prompt_ids = [UNK if rng.random() < config.word_dropout else i
                          for i in tokenizer.encode(qa.question).ids]
        text_ids = tokenizer.encode(text).ids
        row = [BOS, *prompt_ids, SEP, *text_ids, EOS][:max_tokens + 1]
        target = [PAD] * (len(prompt_ids) + 1) + row[len(prompt_ids) + 2:]
        rows.append(row[:-1])
        targets.append(target)
        images.append(prepare_image(picture.image, side).pixels)
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), PAD, dtype=torch.long)
    wanted = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
        tokens[i, :len(row)] = torch.tensor(row)
        wanted[i, :len(target)] = torch.tensor(target)
    return torch.cat(images), tokens, wanted


class ReaderTrainer:
    def __init__(self, config: ReaderTrainConfig) -> None:
        self.config = config
        self.run = RunFolder(Path(config.out))
        self.tokenizer = build_tokenizer()
        self.net_config = ReaderNetConfig(vocab_size=self.tokenizer.get_vocab_size(),
                                          encoder=EncoderKind(config.encoder),
                                          width=config.width, heads=config.width // 32)
        self._build()
        self.step = 0
        self.train_seconds = 0.0

    def _build(self) -> None:
        torch.manual_seed(self.config.seed)
        self.net = ReaderNet(self.net_config)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.config.lr,
                                           weight_decay=0.01, betas=(0.9, 0.98))

    def resume(self) -> bool:
        """Continue from the run's latest checkpoint, with the network it was started with
        (its architecture is the run's; the schedule is the command line's)."""
        found = self.run.latest_state()
        if found is None:
            return False
        checkpoint, state = found
        saved = ReaderNetConfig.from_json(state["net"])
        if saved != self.net_config:
            self.net_config = saved
            self._build()
        self.run.load(checkpoint, self.net, self.optimizer)
        self.step, self.train_seconds = int(state["step"]), float(state["train_seconds"])
        return True

    def train(self, progress: bool = True) -> None:
        config = self.config
        size, window = self.net_config.image_size, self.net_config.max_tokens

        def loss_at(step: int) -> torch.Tensor:
            pixels, tokens, targets = make_batch(config, step, self.tokenizer, size, window)
            logits = self.net(pixels, tokens)  # [B, T, V]
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD)

        def state(step: int, seconds: float) -> dict:
            return {"train_seconds": seconds, "config": asdict(config),
                    "net": self.net_config.to_json()}

        self.step, self.train_seconds = train_loop(
            self.run, self.net, self.optimizer, start=self.step, steps=config.steps,
            lr_at=lambda step: learning_rate(step, config), loss_at=loss_at, state=state,
            seconds=self.train_seconds, checkpoint_minutes=config.checkpoint_minutes,
            progress=progress, desc="train reader")


def export(trainer: ReaderTrainer, folder: Path, command: str) -> None:
    """Write the model folder the toile family loads (see :func:`write_reader_folder`)."""
    write_reader_folder(trainer.net, trainer.tokenizer, folder, {
        "steps": trainer.step, "train_minutes": round(trainer.train_seconds / 60, 1),
        "config": asdict(trainer.config), "command": command})


def write_reader_folder(net: ReaderNet, tokenizer, folder: Path, training: dict) -> None:
    """float16 weights, the tokenizer and ``toile_reader.json`` (network config, decoding
    limit, how it was trained)."""
    meta = {"net": net.config.to_json(), "max_new_tokens": 64, "training": training}
    write_model_folder(folder, net, WEIGHTS_FILE, CONFIG_FILE, meta)
    tokenizer.save(str(folder / TOKENIZER_FILE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toile.train.reader_train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", choices=[k.value for k in EncoderKind], default="conv")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--export", type=Path, default=None,
                        help="after training, write the model folder here")
    parser.add_argument("--export-only", action="store_true",
                        help="export the run's latest checkpoint without training")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = ReaderTrainConfig(out=args.out, steps=args.steps, batch_size=args.batch_size,
                               lr=args.lr, seed=args.seed, encoder=args.encoder,
                               width=args.width, threads=args.threads,
                               checkpoint_minutes=args.checkpoint_minutes)
    trainer = ReaderTrainer(config)
    if args.resume and trainer.resume():
        trainer.config = replace(config)  # the command line's schedule wins on resume
        print(f"resumed at step {trainer.step}", file=sys.stderr)
    if args.export_only:
        if not (args.export and trainer.resume()):
            parser.error("--export-only needs --export DIR and a run with a checkpoint")
    else:
        trainer.train(progress=not args.no_progress)
    if args.export:
        export(trainer, args.export, " ".join(["python -m toile.train.reader_train",
                                                *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def reader_from_checkpoint(checkpoint: Path):  # -> ToileReader
    """A :class:`ToileReader` over a training checkpoint's weights (for grading runs)."""
    from toile.families.toile.reader_model import ToileReader

    state = json.loads((checkpoint / "state.json").read_text())
    net = ReaderNet(ReaderNetConfig.from_json(state["net"]))
    RunFolder.load(checkpoint, net)
    return ToileReader(net, build_tokenizer(), 64)
