"""A cold process that loads the built-in model and generates one image imports neither
diffusers nor transformers (seconds of imports each: the whole command counts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "toile" / "assets" / "toile-mini"
HEAVY = ("diffusers", "transformers", "peft", "scipy", "accelerate")

FAMILY = """
import sys, torch
from pathlib import Path
from toile.families.toile.family import ToileFamily

loaded = ToileFamily().load(Path(sys.argv[1]), "cpu", torch.float32)
pipe = loaded.pipelines["txt2img"]
for sampler in ("Euler", "Heun"):
    image = pipe(["a red circle on a blue background"], seeds=[0], steps=2, sampler=sampler)[0]
    assert image.size == (64, 64)
print(" ".join(m for m in sys.argv[2:] if m in sys.modules))
"""

ENGINE = """
import sys
from toile.engine.engine import Engine
from toile.request import GenerationRequest

result = Engine(device="cpu").run(GenerationRequest(
    "a red circle on a blue background", model=sys.argv[1], steps=2, seed=0))
assert result.images[0].size == (256, 256)  # the default: the base and the toile-sr stage
assert [stage["role"] for stage in result.records[0].stages] == ["base", "upscale"]
print(" ".join(m for m in sys.argv[2:] if m in sys.modules))
"""


def imported(code: str, tmp_path: Path) -> list[str]:
    """Which of HEAVY a fresh interpreter running ``code`` has imported."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOILE_HOME=str(tmp_path / "home"),
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, str(SHIPPED), *HEAVY],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_loading_and_generating_imports_neither_diffusers_nor_transformers(tmp_path):
    assert imported(FAMILY, tmp_path) == []


def test_engine_generation_imports_neither(tmp_path):
    assert imported(ENGINE, tmp_path) == []
