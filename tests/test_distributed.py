"""Training at scale: ``toile finetune`` and ``toile train`` under several processes.

Two CPU processes (gloo backend) are launched with ``torch.distributed.run`` — what
``accelerate launch --multi_gpu`` runs underneath on GPUs — and train tiny toile models a few
steps:

- the replicas stay identical (each rank saves its weights; they are compared bit for bit);
- fine-tuning with 2 processes x batch 2 matches one process with batch 4 (the same global
  batch: every sample's data and noise depend on its position in the global batch) within
  ``TOLERANCE`` — the only difference is the order of the floating-point sums in the gradient
  all-reduce and the batched matmuls.
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

    for kind in ("finetune", "train", "train-data"):
        a = load(runs / "two" / f"{kind}-rank0-of-2.safetensors")
        b = load(runs / "two" / f"{kind}-rank1-of-2.safetensors")
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), f"{kind}: {key} differs between ranks"


def test_two_processes_match_one_with_the_same_global_batch(runs):
    two = load(runs / "two" / "finetune-rank0-of-2.safetensors")
    one = load(runs / "one" / "finetune-rank0-of-1.safetensors")
    assert two.keys() == one.keys()
    worst = max(float((two[k] - one[k]).abs().max()) for k in two)
    moved = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    assert moved > 100 * TOLERANCE  # the adapters did train...
    assert worst <= TOLERANCE, f"max difference {worst:.2e} > {TOLERANCE:.0e}"  # ...the same
    assert (runs / "two" / "lora.safetensors").is_file()  # written once, by the main process
