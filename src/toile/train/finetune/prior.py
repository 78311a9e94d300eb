"""Class images for prior preservation (DreamBooth, Ruiz et al. 2022).

Fine-tuning on a few images of one subject makes a model forget what the subject's *class*
looks like in general ("language drift": every "star" becomes *the* star). DreamBooth's remedy:
before training, let the base model draw N images of the class prompt ("a star on a white
background"), and train on them alongside the instance images, their loss weighted by
``prior_weight``, so the model keeps producing them.

The images are generated through the engine (the same code path as ``toile generate``, with
seeds ``seed, seed + 1, ...``) and cached in ``OUT.class-images/`` with a manifest naming the
model, prompt and size; a later run reuses them, tops them up if more are asked for, and
regenerates them if any of those changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "class-images.json"


def class_image_paths(folder: Path, count: int) -> list[Path]:
    return [folder / f"class-{i:05d}.png" for i in range(count)]


def ensure_class_images(
    folder: Path,
    *,
    model: str | None,
    class_prompt: str,
    count: int,
    width: int,
    height: int,
    seed: int,
    steps: int | None = None,
    device: str | None = None,
    engine: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Make sure ``count`` class images exist in ``folder``; returns their paths.

    ``engine`` (a :class:`toile.engine.engine.Engine`) may be passed in to reuse a loaded
    model; otherwise one is made and dropped afterwards, so its memory is freed before training
    loads the model again.
    """
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {"model": model, "class_prompt": class_prompt, "width": width, "height": height,
              "seed": seed, "steps": steps}
    manifest_path = folder / MANIFEST
    manifest: dict[str, Any] = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = {}
    if {k: manifest.get(k) for k in wanted} != wanted:
        for stale in folder.glob("class-*.png"):
            stale.unlink()
    paths = class_image_paths(folder, count)
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        from toile.engine.engine import Engine
        from toile.request import GenerationRequest

        engine = engine if engine is not None else Engine(device=device)
        for done, i in enumerate(missing, 1):
            request = GenerationRequest(
                class_prompt, model=model, seed=seed + i, width=width, height=height, steps=steps
            )
            image = engine.run(request).images[0]
            tmp = paths[i].with_name(f".{paths[i].name}.tmp-{os.getpid()}")
            image.save(tmp, format="PNG")
            os.replace(tmp, paths[i])
            if progress is not None:
                progress(done, len(missing))
    manifest_path.write_text(json.dumps(wanted | {"count": max(count, manifest.get("count", 0))},
                                        indent=2) + "\n")
    return paths
