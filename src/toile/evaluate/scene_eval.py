"""The scene benchmark behind ``toile eval scenes``: fixed prompt sets and a scored run.

A prompt set is a fixed, balanced, seeded list of scene-world prompts; :func:`evaluate` asks a
generator for one image per prompt and grades each with the scene checker, GenEval style:
accuracy per category (single object, relation, count), overall, and which aspects failed.

The generator is any ``generate(prompts, seeds) -> images`` callable, so this module never
imports the engine (the CLI wires it to a model); tests use a renderer as a perfect "model".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from toile.data.scenes import KINDS, Scene, caption, sample_scene
from toile.errors import RequestError
from toile.evaluate.scene_checker import SceneCheck, check

CATEGORIES: tuple[str, ...] = KINDS  # "single", "relation", "count"
ASPECTS: tuple[str, ...] = ("background", "objects", "size", "count", "relation")

Generate = Callable[[list[str], list[int]], list[Image.Image]]


@dataclass(frozen=True)
class ScenePrompt:
    """One benchmark item: the text given to the model and the scene it must show."""

    prompt: str
    scene: Scene
    category: str


def prompt_set(n: int = 200, seed: int = 0, phrasing: str = "train") -> list[ScenePrompt]:
    """``n`` prompts cycling single / relation / count (balanced to within one), fixed for
    ``seed``. ``phrasing="heldout"`` words the same scenes with templates training never sees,
    to measure generalisation to new wording. No held-out concept (pink, star) appears."""
    return _build_set(n, seed, phrasing, held_out=False)


def held_out_prompt_set(n: int = 60, seed: int = 0, phrasing: str = "train") -> list[ScenePrompt]:
    """Like :func:`prompt_set`, but every prompt involves a held-out concept (pink or star,
    as an object or as the background): the before/after test of a fine-tuning demo."""
    return _build_set(n, seed, phrasing, held_out=True)


def _build_set(n: int, seed: int, phrasing: str, *, held_out: bool) -> list[ScenePrompt]:
    if not isinstance(n, int) or n < 1:
        raise RequestError("n", f"must be a positive int; got {n!r}")
    # Scenes and words come from separate streams, so both phrasings of a seed describe the
    # same scenes and a difference in score is the wording's alone.
    scenes = random.Random(f"toile-scenes-{seed}-{held_out}")
    words = random.Random(f"toile-scene-words-{seed}-{held_out}-{phrasing}")
    items = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        scene = sample_scene(scenes, kinds=(category,), require_held_out=held_out)
        items.append(ScenePrompt(caption(scene, words, phrasing), scene, category))
    return items


@dataclass(frozen=True)
class PromptResult:
    """The verdict on one generated image."""

    prompt: str
    category: str
    seed: int
    passed: bool
    reason: str


@dataclass(frozen=True)
class CategoryScore:
    total: int
    passed: int

    @property
    def accuracy(self) -> float:
        return self.passed / self.total if self.total else 0.0


@dataclass(frozen=True)
class SceneReport:
    """Scores of one run. ``failures`` counts, per aspect, the images that failed it (one image
    can fail several aspects); ``results`` keeps every verdict for inspection."""

    categories: dict[str, CategoryScore]
    failures: dict[str, int]
    results: tuple[PromptResult, ...] = field(repr=False)

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def accuracy(self) -> float:
        return self.passed / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: overall and per-category accuracy, failures, verdicts."""
        return {
            "accuracy": self.accuracy,
            "total": self.total,
            "passed": self.passed,
            "categories": {
                name: {"accuracy": s.accuracy, "total": s.total, "passed": s.passed}
                for name, s in self.categories.items()
            },
            "failures": dict(self.failures),
            "results": [asdict(r) for r in self.results],
        }


def evaluate(
    generate: Generate,
    prompts: list[ScenePrompt],
    *,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> SceneReport:
    """Generate one image per prompt (prompt ``i`` gets seed ``seed + i``, so a run is
    reproducible and independent of the batch size) and grade it.

    ``generate(texts, seeds)`` must return one image per text; ``progress(done, total)`` is
    called after each batch.
    """
    if not prompts:
        raise RequestError("prompts", "must contain at least one ScenePrompt")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RequestError("batch_size", f"must be a positive int; got {batch_size!r}")
    verdicts: list[tuple[ScenePrompt, int, SceneCheck]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        seeds = [seed + start + i for i in range(len(batch))]
        images = generate([p.prompt for p in batch], seeds)
        if len(images) != len(batch):
            raise ValueError(f"generate returned {len(images)} images for {len(batch)} prompts")
        verdicts += [
            (p, s, check(img, p.scene)) for p, s, img in zip(batch, seeds, images, strict=True)
        ]
        if progress is not None:
            progress(len(verdicts), len(prompts))
    return _report(verdicts)


def _report(verdicts: list[tuple[ScenePrompt, int, SceneCheck]]) -> SceneReport:
    categories = {}
    for name in CATEGORIES:
        graded = [c for p, _, c in verdicts if p.category == name]
        if graded:
            categories[name] = CategoryScore(len(graded), sum(c.passed for c in graded))
    failures = {
        aspect: sum(not _aspect_ok(c, aspect) for _, _, c in verdicts) for aspect in ASPECTS
    }
    results = tuple(
        PromptResult(p.prompt, p.category, s, c.passed, c.reason) for p, s, c in verdicts
    )
    return SceneReport(categories, failures, results)


def _aspect_ok(verdict: SceneCheck, aspect: str) -> bool:
    return bool(getattr(verdict, f"{aspect}_ok"))
