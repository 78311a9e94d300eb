"""Training at scale: ``toile finetune`` and ``toile train`` under several processes.

Two CPU processes (gloo backend) are launched with ``torch.distributed.run`` — what
``accelerate launch --multi_gpu`` runs underneath on GPUs — and train tiny toile models a few
steps:

- the replicas stay identical (each rank saves its weights; they are compared bit for bit);
- fine-tuning with 2 processes x batch 2 matches one process with batch 4 (the same global
  batch: every sample's data and noise depend on its position in the global batch) within
  ``TOLERANCE`` — the only difference is the order of the floating-point sums in the gradient
  all-reduce and the batched matmuls — and so do 2 micro-batches of gradient accumulation, on
  one process and on two.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_common import make_images, make_tiny_toile

DRIVER = Path(__file__).parent / "distributed_driver.py"
TOLERANCE = 1e-5  # max |difference| of any trained weight after 3 AdamW steps at lr 1e-3


def launch(args: list[str], procs: int) -> None:
    # ACCELERATE_USE_CPU: what ``accelerate launch --cpu`` sets; it makes accelerate join the
    # processes in one gloo group on a machine without GPUs (``accelerate launch`` itself runs
    # several CPU processes only through mpirun, which this machine lacks).
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "ACCELERATE_USE_CPU": "1"}
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={procs}", str(DRIVER), *args]
    else:
        command = [sys.executable, str(DRIVER), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from toile.families.toile.testing import tiny_text_encoder

    root = tmp_path_factory.mktemp("distributed")
    text = tiny_text_encoder(root / "text")
    model = make_tiny_toile(root / "model", text)
    images = make_images(root / "images", n=6, size=24, captions=True)
    common = [str(model), str(images), str(text)]
    launch([*common, str(root / "two"), "2"], procs=2)
    launch([*common, str(root / "one"), "4"], procs=1)
    return root


def load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_replicas_stay_identical(runs):
    import torch

    for kind in ("finetune", "accum", "train", "train-data"):
        a = load(runs / "two" / f"{kind}-rank0-of-2.safetensors")
        b = load(runs / "two" / f"{kind}-rank1-of-2.safetensors")
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), f"{kind}: {key} differs between ranks"


def test_finetune_fsdp_matches_ddp(runs):
    """``toile finetune --fsdp`` with 2 processes: the LoRA (2 DDP steps + checkpoint + a 3rd
    resumed under FSDP) and a full fine-tune match the replicated runs within ``TOLERANCE``,
    and the outputs are written from the gathered weights (LoRA file, full model folder with
    the same U-Net)."""
    import json

    from safetensors.torch import load_file

    samples = runs / "two" / "lora-fsdp.safetensors.checkpoints" / "samples"
    assert [p.name for p in samples.iterdir()] == ["step-000003.png"]  # drawn sharded
    info = json.loads((runs / "two" / "finetune-fsdp-rank1-of-2.json").read_text())
    assert info["sharded"] and info["local"] < 0.6 * info["total"], info
    pairs = (("finetune-fsdp", "finetune"), ("full-fsdp", "full-ddp"))
    for sharded_name, replicated_name in pairs:
        sharded = load(runs / "two" / f"{sharded_name}-rank0-of-2.safetensors")
        replicated = load(runs / "two" / f"{replicated_name}-rank0-of-2.safetensors")
        assert sharded.keys() == replicated.keys() and sharded
        worst = max(float((sharded[k] - replicated[k]).abs().max()) for k in sharded)
        assert worst <= TOLERANCE, f"{sharded_name}: max difference {worst:.2e}"
    lora = load(runs / "two" / "lora-fsdp.safetensors")
    assert lora.keys() == load(runs / "two" / "lora.safetensors").keys()
    full = load(runs / "two" / "full-fsdp-rank0-of-2.safetensors")
    saved = load_file(str(runs / "two" / "full-fsdp" / "unet" / "diffusion_pytorch_model"
                                                               ".safetensors"))
    assert saved.keys() == {k.removeprefix("unet.") for k in full}
    for key, value in full.items():
        assert float((saved[key.removeprefix("unet.")].float() - value).abs().max()) < 1e-2


def test_fsdp_shards_the_model_and_trains_like_ddp(runs):
    """``toile train --fsdp`` with 2 processes: each holds about half of the weights, and 2 steps
    + a checkpoint + resume for a 3rd give DDP's 3 straight steps (weights and EMA) within
    ``TOLERANCE``; the checkpoint's sample grid and an export come from the gathered EMA."""
    import json

    import torch

    for rank in (0, 1):
        info = json.loads((runs / "two" / f"fsdp-rank{rank}-of-2.json").read_text())
        assert info["sharded"] and info["local"] < 0.6 * info["total"], info
    assert not json.loads((runs / "one" / "fsdp-rank0-of-1.json").read_text())["sharded"]
    for kind in ("train-fsdp", "train-fsdp-ema"):
        sharded = load(runs / "two" / f"{kind}-rank0-of-2.safetensors")
        replicated = load(runs / "two" / f"{kind.replace('fsdp', 'ddp')}-rank0-of-2.safetensors")
        assert sharded.keys() == replicated.keys() and sharded
        worst = max(float((sharded[k] - replicated[k]).abs().max()) for k in sharded)
        assert worst <= TOLERANCE, f"{kind}: max difference {worst:.2e} > {TOLERANCE:.0e}"
        other = load(runs / "two" / f"{kind}-rank1-of-2.safetensors")
        assert all(torch.equal(sharded[k], other[k]) for k in sharded)
    two_steps = load(runs / "two" / "train-rank0-of-2.safetensors")
    three_steps = load(runs / "two" / "train-fsdp-rank0-of-2.safetensors")
    moved = max(float((three_steps[k] - two_steps[k]).abs().max()) for k in two_steps)
    assert moved > 100 * TOLERANCE  # the third step did train: the match above is not vacuous
    assert (runs / "two" / "train-fsdp" / "samples" / "step-000002.png").is_file()
    assert (runs / "two" / "fsdp-export" / "model_index.json").is_file()


def test_two_processes_match_one_with_the_same_global_batch(runs):
    two = load(runs / "two" / "finetune-rank0-of-2.safetensors")
    one = load(runs / "one" / "finetune-rank0-of-1.safetensors")
    assert two.keys() == one.keys()
    worst = max(float((two[k] - one[k]).abs().max()) for k in two)
    moved = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    assert moved > 100 * TOLERANCE  # the adapters did train...
    assert worst <= TOLERANCE, f"max difference {worst:.2e} > {TOLERANCE:.0e}"  # ...the same
    assert (runs / "two" / "lora.safetensors").is_file()  # written once, by the main process


def test_gradient_accumulation_matches_the_whole_batch(runs):
    """Micro-batches of half the size, 2 per step (``--gradient-accumulation-steps 2``), on one
    process and on two (DDP syncing in the last backward only): the same steps as one process
    with the whole batch."""
    one = load(runs / "one" / "finetune-rank0-of-1.safetensors")
    for run in (runs / "one" / "accum-rank0-of-1.safetensors",
                runs / "two" / "accum-rank0-of-2.safetensors"):
        accumulated = load(run)
        assert accumulated.keys() == one.keys()
        worst = max(float((accumulated[k] - one[k]).abs().max()) for k in one)
        assert worst <= TOLERANCE, f"{run.name}: max difference {worst:.2e} > {TOLERANCE:.0e}"


def test_train_accumulation_on_one_process_matches_two_processes(runs):
    """``toile train --gradient-accumulation-steps 2 --gradient-checkpointing`` on one process
    makes the steps of 2 processes without either (micro-batch j is process j's batch)."""
    two = load(runs / "two" / "train-rank0-of-2.safetensors")
    one = load(runs / "one" / "train-accum-rank0-of-1.safetensors")
    base = load(runs / "one" / "train-rank0-of-1.safetensors")  # one process, one micro-batch
    assert two.keys() == one.keys()
    worst = max(float((two[k] - one[k]).abs().max()) for k in two)
    apart = max(float((two[k] - base[k]).abs().max()) for k in two)
    assert apart > 100 * TOLERANCE  # a different batch trains differently: not vacuous
    assert worst <= TOLERANCE, f"max difference {worst:.2e} > {TOLERANCE:.0e}"
