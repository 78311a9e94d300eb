"""Run by ``tests/test_distributed.py`` once per process under ``torch.distributed.run`` (and
once alone): fine-tune a tiny toile model a few steps with ``toile finetune``'s runner, train
one from scratch a few steps with ``toile train``'s trainer (on the scene world, replicated and
sharded with ``--fsdp``, then on the images folder streamed as ``--data``), and save each
process's weights.

    python tests/distributed_driver.py MODEL IMAGES TEXT OUT BATCH_PER_PROCESS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model: str, images: str, text: str, out: str, batch: int) -> None:
    import torch
    from safetensors.torch import save_file

    from toile.families.toile.testing import tiny_model_config
    from toile.train.config import preset
    from toile.train.finetune.config import FinetuneConfig
    from toile.train.finetune.runner import FinetuneRunner
    from toile.train.sharding import gathered
    from toile.train.trainer import Trainer

    torch.set_num_threads(1)
    root = Path(out)
    runner = FinetuneRunner(
        FinetuneConfig(images=images, out=str(root / "lora.safetensors"), model=model,
                       prompt="a sks square", steps=3, lr=1e-3, batch_size=batch,
                       progress_bar=False),
        command="distributed test", echo=lambda _m: None,
    )
    runner.run()
    rank, world = runner.accelerator.process_index, runner.accelerator.num_processes
    save_file({n: p.detach().cpu().contiguous() for n, p in runner.trainable.items()},
              str(root / f"finetune-rank{rank}-of-{world}.safetensors"))

    def finetune(name: str, **changes: object) -> FinetuneRunner:
        values = {"images": images, "model": model, "prompt": "a sks square", "steps": 3,
                  "lr": 1e-3, "batch_size": batch, "progress_bar": False} | changes
        tuner = FinetuneRunner(FinetuneConfig(out=str(root / name), **values),  # type: ignore[arg-type]
                               command="distributed test", echo=lambda _m: None)
        tuner.run()
        return tuner

    # Gradient accumulation: the same global batch as micro-batches of half the size (DDP
    # syncs in the last micro-batch's backward only).
    tuner = finetune("accum.safetensors", batch_size=batch // 2, gradient_accumulation_steps=2)
    save_file({n: p.detach().cpu().contiguous() for n, p in tuner.trainable.items()},
              str(root / f"accum-rank{rank}-of-{world}.safetensors"))

    # ``toile finetune --fsdp``: the LoRA over 2 replicated steps + a checkpoint + a 3rd step
    # resumed sharded (the files are the same either way), and full fine-tuning, each against
    # the replicated run of the same 3 steps.
    finetune("lora-fsdp.safetensors", steps=2)
    # (The resumed run also draws a validation grid: under FSDP every process takes part.)
    sharded = finetune("lora-fsdp.safetensors", fsdp=True, resume=True,
                       validation_prompts=("a sks square",))
    save_file(gathered(sharded.trainable), str(root / f"finetune-fsdp-rank{rank}-of-{world}"
                                                      ".safetensors"))
    for kind, fsdp in (("full-fsdp", True), ("full-ddp", False)):
        tuner = finetune(kind, method="full", fsdp=fsdp)
        save_file(gathered(tuner.trainable), str(root / f"{kind}-rank{rank}-of-{world}"
                                                        ".safetensors"))
        if fsdp:  # how much of the U-Net this process holds
            local = sum(p.to_local().numel() if tuner.sharded else p.numel() for p in
                        tuner.trainable.values())
            (root / f"finetune-fsdp-rank{rank}-of-{world}.json").write_text(json.dumps(
                {"sharded": tuner.sharded, "local": local,
                 "total": sum(p.numel() for p in tuner.trainable.values())}))

    config = preset("tiny", out_dir=str(root / "train"), model=tiny_model_config(text), steps=2,
                    samples_with_checkpoints=False)
    trainer = Trainer(config, command="distributed test")
    trainer.train()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainer.unwrapped.state_dict().items()},
              str(root / f"train-rank{rank}-of-{world}.safetensors"))
    if world == 1:
        # Two micro-batches on one process draw what two processes draw (slots 0 and 1), with
        # the activations recomputed in the backward pass: the 2-process run's weights.
        trainer = Trainer(config.with_changes(out_dir=str(root / "train-accum"),
                                              gradient_accumulation_steps=2,
                                              gradient_checkpointing=True), command="test")
        trainer.train()
        save_file({k: v.detach().cpu().contiguous()
                   for k, v in trainer.unwrapped.state_dict().items()},
                  str(root / "train-accum-rank0-of-1.safetensors"))

    # ``toile train --fsdp``: 2 steps, a checkpoint, then resumed for a 3rd, against DDP's 3
    # straight steps. Samples and an export go through the gathered EMA.
    sharded = Trainer(config.with_changes(out_dir=str(root / "train-fsdp"), fsdp=True,
                                          samples_with_checkpoints=True), command="test")
    sharded.train()
    sharded = Trainer(config.with_changes(out_dir=str(root / "train-fsdp"), fsdp=True, steps=3,
                                          resume=True), command="test")
    sharded.train()
    sharded.export(root / "fsdp-export")
    local = sum(p.to_local().numel() if sharded.sharded else p.numel()
                for p in sharded.unwrapped.parameters())
    (root / f"fsdp-rank{rank}-of-{world}.json").write_text(json.dumps(
        {"sharded": sharded.sharded, "local": local,
         "total": sum(p.numel() for p in sharded.unwrapped.parameters())}))
    save_file(gathered(sharded.unwrapped.state_dict()),
              str(root / f"train-fsdp-rank{rank}-of-{world}.safetensors"))
    save_file(sharded.ema_state(), str(root / f"train-fsdp-ema-rank{rank}-of-{world}.safetensors"))
    replicated = Trainer(config.with_changes(out_dir=str(root / "train-ddp"), steps=3),
                         command="test")
    replicated.train()
    save_file(gathered(replicated.unwrapped.state_dict()),
              str(root / f"train-ddp-rank{rank}-of-{world}.safetensors"))
    save_file(replicated.ema_state(),
              str(root / f"train-ddp-ema-rank{rank}-of-{world}.safetensors"))

    # ``toile train --data``: each process streams its own share of the folder.
    streamed = Trainer(config.with_changes(out_dir=str(root / "train-data"), data=images,
                                           batch_size=2), command="distributed test")
    streamed.train()
    save_file({k: v.detach().cpu().contiguous()
               for k, v in streamed.unwrapped.state_dict().items()},
              str(root / f"train-data-rank{rank}-of-{world}.safetensors"))


if __name__ == "__main__":
    model, images, text, out, batch = sys.argv[1:6]
    main(model, images, text, out, int(batch))
