"""The scene world: sampling, rendering, captions and the prompt parser."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import numpy as np
import pytest

from toile.data.scene_parser import parse_prompt
from toile.data.scenes import (
    ALL_COLORS,
    ALL_SHAPES,
    COLORS,
    COUNT_WORDS,
    HELD_OUT_COLORS,
    HELD_OUT_SHAPES,
    KINDS,
    PALETTE,
    PHRASINGS,
    RELATIONS,
    SIZES,
    Scene,
    SceneObject,
    caption,
    generate_pair,
    render,
    sample_scene,
    templates,
)


def _scenes(n: int, seed: int = 0, **kwargs: object) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


# --- sampling --------------------------------------------------------------------------------


def test_sampling_is_deterministic_for_a_seed() -> None:
    assert _scenes(50, seed=3) == _scenes(50, seed=3)
    assert _scenes(50, seed=3) != _scenes(50, seed=4)


def test_generate_pair_is_deterministic_for_a_seed() -> None:
    image_a, text_a, scene_a = generate_pair(random.Random(9))
    image_b, text_b, scene_b = generate_pair(random.Random(9))
    assert (text_a, scene_a) == (text_b, scene_b)
    assert image_a.tobytes() == image_b.tobytes()


def test_held_out_concepts_are_never_sampled_by_default() -> None:
    for scene in _scenes(1500):
        assert not scene.uses_held_out
        assert scene.background in COLORS
    sampled = _scenes(400, allow_held_out=True)
    assert any(o.color in HELD_OUT_COLORS for s in sampled for o in s.objects)
    assert any(o.shape in HELD_OUT_SHAPES for s in sampled for o in s.objects)


def test_require_held_out_always_includes_one() -> None:
    assert all(s.uses_held_out for s in _scenes(200, require_held_out=True))


def test_sampled_scenes_cover_the_grammar() -> None:
    scenes = _scenes(600)
    assert {s.kind for s in scenes} == set(KINDS)
    assert {s.relation for s in scenes if s.kind == "relation"} == set(RELATIONS)
    assert {s.count for s in scenes if s.kind == "count"} == {2, 3, 4}
    assert {s.objects[0].size for s in scenes if s.kind == "single"} == set(SIZES)
    for scene in scenes:
        assert all(o.color != scene.background for o in scene.objects)


def test_kinds_restricts_the_sample() -> None:
    assert {s.kind for s in _scenes(60, kinds=("count",))} == {"count"}


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: SceneObject("hexagon", "red"), "shape"),
        (lambda: SceneObject("circle", "teal"), "color"),
        (lambda: SceneObject("circle", "red", "huge"), "size"),
        (lambda: Scene("single", "red", (SceneObject("circle", "red"),)), "objects"),
        (lambda: Scene("count", "blue", (SceneObject("circle", "red"),), count=5), "count"),
        (
            lambda: Scene("single", "blue", (SceneObject("circle", "red"),), relation="above"),
            "relation",
        ),
        (
            lambda: Scene("relation", "blue", (SceneObject("star", "red"),) * 2, relation="above"),
            "objects",
        ),
        (lambda: Scene("crowd", "blue", (SceneObject("circle", "red"),)), "kind"),
    ],
)
def test_invalid_scenes_raise_naming_the_field(build: object, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        build()  # type: ignore[operator]


def test_bad_arguments_raise_naming_argument_and_allowed_values() -> None:
    scene = _scenes(1)[0]
    with pytest.raises(ValueError, match=r"phrasing.*'train', 'heldout'.*'casual'"):
        caption(scene, random.Random(0), phrasing="casual")
    with pytest.raises(ValueError, match="phrasing"):
        generate_pair(random.Random(0), phrasing="casual")
    with pytest.raises(ValueError, match=r"kinds.*'single', 'relation', 'count'"):
        sample_scene(random.Random(0), kinds=("crowd",))
    with pytest.raises(ValueError, match="size"):
        render(scene, size=4)


# --- rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128])
def test_render_size_mode_and_background(size: int) -> None:
    for scene in _scenes(12, seed=size):
        image = render(scene, size, random.Random(1))
        assert image.size == (size, size)
        assert image.mode == "RGB"
        pixels = np.asarray(image)
        border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)])
        assert (border == PALETTE[scene.background]).all()


def test_render_is_the_same_picture_at_any_size() -> None:
    """Layout is in canvas fractions, so a 128 px render shrunk to 64 matches the 64 px one."""
    for scene in _scenes(10, seed=5):
        small = np.asarray(render(scene, 64, random.Random(2)), dtype=float)
        large = render(scene, 128, random.Random(2)).reduce(2)
        assert np.abs(small - np.asarray(large, dtype=float)).mean() < 2.0


def test_render_draws_the_object_colours() -> None:
    for scene in _scenes(30, seed=7, allow_held_out=True):
        pixels = {tuple(p) for p in np.asarray(render(scene)).reshape(-1, 3).tolist()}
        assert all(PALETTE[o.color] in pixels for o in scene.objects)


def test_render_fills_in_free_fields() -> None:
    scene = Scene(
        "relation", None, (SceneObject("star", "pink"), SceneObject("circle", "blue")), "above"
    )
    image = render(scene, 64, random.Random(0))
    corner = tuple(int(v) for v in np.asarray(image)[0, 0])
    assert corner in {PALETTE[c] for c in COLORS} - {PALETTE["pink"], PALETTE["blue"]}


# --- captions and parsing --------------------------------------------------------------------


@pytest.mark.parametrize("phrasing", PHRASINGS)
def test_parse_inverts_caption(phrasing: str) -> None:
    rng = random.Random(phrasing)
    for i in range(500):
        scene = sample_scene(rng, allow_held_out=i % 2 == 0)
        text = caption(scene, rng, phrasing)
        assert parse_prompt(text) == scene, text


def _skeleton(text: str) -> str:
    """A caption with its vocabulary replaced by placeholders: which template wrote it."""
    words = [
        *ALL_COLORS,
        *(s + "s" for s in ALL_SHAPES),
        *ALL_SHAPES,
        *SIZES,
        *COUNT_WORDS.values(),
    ]
    text = re.sub(r"\b(" + "|".join(words) + r")\b", "_", text)
    text = re.sub(r"\ban? _", "a _", text)
    return re.sub(r"\b[0-9]\b", "#", text)


def test_phrasing_varies_and_held_out_templates_are_disjoint() -> None:
    observed: dict[str, set[str]] = {p: set() for p in PHRASINGS}
    rng = random.Random(1)
    for kind in KINDS:
        for phrasing in PHRASINGS:
            seen = {
                _skeleton(caption(sample_scene(rng, kinds=(kind,)), rng, phrasing))
                for _ in range(300)
            }
            minimum = 8 if phrasing == "train" else 4
            assert len(templates(phrasing, kind)) >= minimum
            assert len(seen) >= minimum, (kind, phrasing, seen)
            observed[phrasing] |= seen
    assert not observed["train"] & observed["heldout"]


def test_captions_name_every_stated_field() -> None:
    rng = random.Random(4)
    for scene in _scenes(200, seed=4):
        text = caption(scene, rng)
        assert scene.background in text
        for obj in scene.objects:
            assert obj.color in text and obj.shape in text
            assert obj.size is None or obj.size in text


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            "a red circle on a blue background",
            Scene("single", "blue", (SceneObject("circle", "red"),)),
        ),
        (
            "a pink star left of a blue circle",
            Scene(
                "relation",
                None,
                (SceneObject("star", "pink"), SceneObject("circle", "blue")),
                "left of",
            ),
        ),
        (
            "a blue circle with a red square to its left",
            Scene(
                "relation",
                None,
                (SceneObject("square", "red"), SceneObject("circle", "blue")),
                "left of",
            ),
        ),
        (
            "three small red circles on black",
            Scene("count", "black", (SceneObject("circle", "red", "small"),), count=3),
        ),
        (
            "A large Yellow Square, over a purple backdrop.",
            Scene("single", "purple", (SceneObject("square", "yellow", "large"),)),
        ),
        ("2 white stars", Scene("count", None, (SceneObject("star", "white"),), count=2)),
    ],
)
def test_parse_plain_prompts(prompt: str, expected: Scene) -> None:
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "a dog on a skateboard",
        "a circle on a blue background",  # no colour
        "red circles on white",  # plural without a number
        "five red circles",  # count outside the world
        "a blue circle on blue",  # object the colour of the background
        "a red circle and a blue square",  # two objects, no relation
        "a red circle above a red circle",  # relation needs two different objects
        "a red blue circle",  # two colours on one object
        "a red circle left of a blue square above a green star",  # three objects
        "a red circle on a blue background on a green background",
    ],
)
def test_parse_rejects_prompts_outside_the_world(prompt: str) -> None:
    assert parse_prompt(prompt) is None


def test_scenes_module_does_not_import_torch() -> None:
    code = "import sys, toile.data.scenes; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
