"""The scene checker and the scene benchmark, validated against the renderer both ways."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
from PIL import Image

from toile.data.scene_parser import parse_prompt
from toile.data.scenes import (
    ALL_COLORS,
    ALL_SHAPES,
    Scene,
    SceneObject,
    render,
    sample_scene,
)
from toile.evaluate.scene_checker import check
from toile.evaluate.scene_eval import (
    CATEGORIES,
    ScenePrompt,
    evaluate,
    held_out_prompt_set,
    prompt_set,
)

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ASPECTS_BY_KIND = {
    "single": ("background", "color", "shape", "size", "count"),
    "relation": ("background", "color", "shape", "relation", "missing"),
    "count": ("background", "color", "shape", "count"),
}


def _replace_object(scene: Scene, rng: random.Random, attribute: str) -> Scene:
    index = rng.randrange(len(scene.objects))
    old = scene.objects[index]
    while True:
        if attribute == "color":
            choices = [c for c in ALL_COLORS if c not in (old.color, scene.background)]
        else:
            choices = [s for s in ALL_SHAPES if s != old.shape]
        new = dataclasses.replace(old, **{attribute: rng.choice(choices)})
        objects = list(scene.objects)
        objects[index] = new
        try:
            return dataclasses.replace(scene, objects=tuple(objects))
        except ValueError:  # made the two relation objects identical: draw again
            continue


def _other_count(scene: Scene, rng: random.Random) -> Scene:
    obj = scene.objects[0]
    if scene.kind == "single":
        return Scene("count", scene.background, (obj,), count=rng.randint(2, 4))
    count = scene.count + rng.choice((-1, 1)) if scene.count < 4 else 3
    if count == 1:
        return Scene("single", scene.background, (obj,))
    return dataclasses.replace(scene, count=count)


def perturb(scene: Scene, rng: random.Random, aspect: str) -> Scene:
    """The same scene with exactly one aspect changed, so its render must fail the check."""
    if aspect == "background":
        used = {scene.background, *(o.color for o in scene.objects)}
        return dataclasses.replace(
            scene, background=rng.choice([c for c in ALL_COLORS if c not in used])
        )
    if aspect in ("color", "shape"):
        return _replace_object(scene, rng, aspect)
    if aspect == "size":
        obj = scene.objects[0]
        flipped = dataclasses.replace(obj, size="small" if obj.size == "large" else "large")
        return dataclasses.replace(scene, objects=(flipped,))
    if aspect == "count":
        return _other_count(scene, rng)
    if aspect == "relation":
        if rng.random() < 0.5:
            return dataclasses.replace(scene, relation=OPPOSITE[scene.relation])
        return dataclasses.replace(scene, objects=scene.objects[::-1])
    return Scene("single", scene.background, (scene.objects[rng.randrange(2)],))  # "missing"


# --- validation both ways --------------------------------------------------------------------


def test_checker_passes_truth_and_fails_any_single_change() -> None:
    rng = random.Random(2024)
    truths, rejections, shown = [], [], []
    for i in range(300):
        scene = sample_scene(rng, allow_held_out=i % 2 == 0)
        size = rng.choice((64, 64, 128, 256))
        verdict = check(render(scene, size, rng), scene)
        truths.append(verdict.passed)
        if not verdict.passed:
            shown.append(("truth", scene, verdict.reason))
        for aspect in ASPECTS_BY_KIND[scene.kind]:
            other = perturb(scene, rng, aspect)
            fooled = check(render(other, size, rng), scene).passed
            rejections.append(not fooled)
            if fooled:
                shown.append((aspect, scene, other))
    assert np.mean(truths) >= 0.99, shown[:5]
    assert np.mean(rejections) >= 0.99, shown[:5]
    assert len(rejections) >= 1200


def test_held_out_concepts_are_graded() -> None:
    rng = random.Random(5)
    for _ in range(40):
        scene = sample_scene(rng, require_held_out=True)
        assert check(render(scene, 64, rng), scene).passed
    star = Scene("single", "blue", (SceneObject("star", "pink", "large"),))
    for other in (SceneObject("triangle", "pink", "large"), SceneObject("star", "red", "large")):
        assert not check(render(dataclasses.replace(star, objects=(other,))), star).passed


def test_checker_tolerates_mild_noise() -> None:
    rng, noise = random.Random(8), np.random.default_rng(8)
    passed = []
    for _ in range(60):
        scene = sample_scene(rng, allow_held_out=True)
        pixels = np.asarray(render(scene, 64, rng), dtype=float) + noise.normal(0, 8, (64, 64, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        passed.append(check(image, scene).passed)
    assert np.mean(passed) >= 0.95


def test_checker_accepts_other_modes_and_aspects() -> None:
    scene = Scene(
        "relation", "white", (SceneObject("square", "red"), SceneObject("circle", "blue")), "above"
    )
    image = render(scene, 128, random.Random(3))
    assert check(image.convert("RGBA"), scene).passed
    assert check(image.resize((192, 128)), scene).passed
    with pytest.raises(TypeError, match="PIL"):
        check(np.zeros((64, 64, 3)), scene)  # type: ignore[arg-type]


def test_verdict_fields() -> None:
    scene = Scene("count", "black", (SceneObject("triangle", "yellow"),), count=3)
    image = render(scene, 64, random.Random(1))
    good = check(image, scene)
    assert good.passed and good.reason == ""
    assert good.detection is not None and len(good.detection.objects) == 3
    bad = check(image, dataclasses.replace(scene, count=2))
    assert not bad.passed and not bad.count_ok and bad.objects_ok and bad.background_ok
    assert "expected 2" in bad.reason
    swapped = Scene(
        "relation",
        "white",
        (SceneObject("square", "red"), SceneObject("circle", "blue")),
        "left of",
    )
    verdict = check(render(dataclasses.replace(swapped, relation="right of")), swapped)
    assert (verdict.relation_ok, verdict.objects_ok, verdict.count_ok) == (False, True, True)
    assert "not left of" in verdict.reason


def test_unstated_fields_are_not_graded() -> None:
    scene = parse_prompt("a pink star left of a blue circle")
    assert scene is not None and scene.background is None
    for seed in range(5):
        assert check(render(scene, 64, random.Random(seed)), scene).passed


# --- the benchmark ---------------------------------------------------------------------------


def _renderer(truth: bool):
    """A fake model: renders the prompt's own scene (perfect) or some other scene."""

    def generate(texts: list[str], seeds: list[int]) -> list[Image.Image]:
        images = []
        for text, seed in zip(texts, seeds, strict=True):
            rng = random.Random(seed)
            scene = parse_prompt(text) if truth else sample_scene(rng)
            assert scene is not None, text
            images.append(render(scene, 64, rng))
        return images

    return generate


def test_prompt_sets_are_balanced_and_deterministic() -> None:
    prompts = prompt_set(30, seed=1)
    assert prompts == prompt_set(30, seed=1) and prompts != prompt_set(30, seed=2)
    assert [p.category for p in prompts].count("relation") == 10
    assert all(p.category == p.scene.kind and not p.scene.uses_held_out for p in prompts)
    assert all(parse_prompt(p.prompt) == p.scene for p in prompt_set(30, phrasing="heldout"))
    # Both phrasings describe the same scenes, in different words.
    reworded = prompt_set(30, seed=1, phrasing="heldout")
    assert [p.scene for p in reworded] == [p.scene for p in prompts]
    assert all(a.prompt != b.prompt for a, b in zip(reworded, prompts, strict=True))
    held_out = held_out_prompt_set(30)
    assert all(p.scene.uses_held_out for p in held_out)
    assert {p.category for p in held_out} == set(CATEGORIES)


def test_evaluate_scores_a_perfect_model_one() -> None:
    prompts = prompt_set(24, seed=0)
    calls: list[tuple[int, int]] = []
    report = evaluate(
        _renderer(True), prompts, batch_size=5, seed=10, progress=lambda d, t: calls.append((d, t))
    )
    assert report.accuracy == 1.0 and report.total == 24
    assert all(score.accuracy == 1.0 for score in report.categories.values())
    assert set(report.categories) == set(CATEGORIES)
    assert calls == [(5, 24), (10, 24), (15, 24), (20, 24), (24, 24)]
    assert [r.seed for r in report.results] == list(range(10, 34))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["accuracy"] == 1.0 and set(data["failures"]) >= {"objects", "relation", "count"}


def test_evaluate_scores_a_wrong_model_low() -> None:
    report = evaluate(_renderer(False), prompt_set(24, seed=0), batch_size=8)
    assert report.accuracy <= 0.1
    assert report.failures["objects"] > 12
    assert all(r.reason for r in report.results if not r.passed)


def test_evaluate_rejects_bad_input() -> None:
    prompts = prompt_set(3)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(_renderer(True), prompts, batch_size=0)
    with pytest.raises(ValueError, match="prompts"):
        evaluate(_renderer(True), [])
    with pytest.raises(ValueError, match="returned 0 images for 3 prompts"):
        evaluate(lambda texts, seeds: [], prompts)
    with pytest.raises(ValueError, match=r"phrasing.*'train', 'heldout'"):
        prompt_set(3, phrasing="slang")
    with pytest.raises(ValueError, match="n: must be a positive int"):
        prompt_set(0)
    assert isinstance(prompts[0], ScenePrompt)
