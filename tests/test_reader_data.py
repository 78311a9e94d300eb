"""The reader's training data: varied pictures, canonical captions, questions and answers."""

from __future__ import annotations

import random

import pytest

from toile.data.reader_text import (
    CAPTION_PROMPT,
    QuestionKind,
    applies,
    canonical,
    long_caption,
    question_templates,
    same_scene,
    sample_qa,
    short_caption,
    split_words,
    vocabulary,
)
from toile.data.scene_parser import parse_prompt
from toile.data.scenes import Scene, SceneObject
from toile.data.varied_render import (
    SIZE_SPLIT,
    layout,
    relation_of,
    sample_any_scene,
    varied_picture,
)
from toile.evaluate.reader_eval import evaluate_reader

RED_SQUARE = SceneObject("square", "red")
GREEN_CIRCLE = SceneObject("circle", "green")
PAIR = Scene("relation", "white", (RED_SQUARE, GREEN_CIRCLE), relation="left of")


def test_short_captions_parse_back_to_their_scene() -> None:
    rng = random.Random(0)
    for _ in range(600):
        scene = sample_any_scene(rng)
        text = short_caption(scene)
        assert same_scene(parse_prompt(text), scene), text


def test_long_caption_starts_with_the_short_one_and_lists_every_object() -> None:
    picture = varied_picture(random.Random(3), Scene("count", "blue", (RED_SQUARE,), count=3))
    text = long_caption(picture.scene, picture.placements)
    sentences = text.split(" . ")
    assert sentences[0] == "three red squares on a blue background"
    assert len(sentences) == 4 and all("red square is in the" in s for s in sentences[1:])


def test_a_relation_is_one_picture_either_way_round() -> None:
    flipped = Scene("relation", "white", (GREEN_CIRCLE, RED_SQUARE), relation="right of")
    assert same_scene(PAIR, flipped)
    assert canonical(flipped) == PAIR
    assert short_caption(flipped) == "a red square to the left of a green circle on a white " \
                                     "background"
    assert not same_scene(PAIR, Scene("relation", "white", (RED_SQUARE, GREEN_CIRCLE),
                                      relation="above"))
    assert not same_scene(PAIR, None)


def test_pictures_are_deterministic_per_seed_and_vary_between_seeds() -> None:
    first = varied_picture(random.Random(11))
    again = varied_picture(random.Random(11))
    assert first.scene == again.scene and first.image.tobytes() == again.image.tobytes()
    sizes = {varied_picture(random.Random(s)).image.size for s in range(40)}
    assert len(sizes) > 3  # canvases other than 64 px


def test_layouts_keep_what_the_scene_states() -> None:
    rng = random.Random(5)
    for _ in range(300):
        scene = sample_any_scene(rng)
        placed = layout(scene, rng)
        assert all(p.x - p.extent / 2 >= 0 and p.x + p.extent / 2 <= 1 for p in placed)
        if scene.kind == "relation":
            assert relation_of(placed[0], placed[1]) == scene.relation
        elif scene.kind == "count":
            assert len(placed) == scene.count
        else:
            assert (placed[0].extent < SIZE_SPLIT) == (scene.objects[0].size == "small")


@pytest.mark.parametrize("kind", list(QuestionKind))
def test_answers_match_the_scene(kind: QuestionKind) -> None:
    single = Scene("single", "black", (SceneObject("star", "yellow", "large"),))
    counted = Scene("count", "purple", (SceneObject("triangle", "orange"),), count=4)
    rng = random.Random(kind.value)
    for scene in (single, PAIR, counted):
        if not applies(kind, scene):
            with pytest.raises(ValueError):
                sample_qa(scene, tuple(layout(scene, rng)), rng, kind=kind)
            continue
        for _ in range(30):
            qa = sample_qa(scene, tuple(layout(scene, rng)), rng, kind=kind)
            assert qa.kind is kind
            assert "{" not in qa.question
            assert qa.answer == _expected(scene, qa.question, kind), qa


def _expected(scene: Scene, question: str, kind: QuestionKind) -> str:
    """An independent reading of the question (by its words) against the scene."""
    words = split_words(question)
    colors = [w for w in words if w in {"red", "orange", "yellow", "green", "blue", "purple",
                                        "white", "black", "pink"}]
    shapes = [w.rstrip("s") for w in words if w.rstrip("s") in {"circle", "square", "triangle",
                                                                 "star"}]
    objs = scene.objects
    if kind is QuestionKind.BACKGROUND:
        return str(scene.background)
    if kind is QuestionKind.COLOR:
        return next(o.color for o in objs if o.shape == shapes[0])
    if kind is QuestionKind.SHAPE:
        return next(o.shape for o in objs if o.color == colors[0])
    if kind is QuestionKind.SIZE:
        return str(objs[0].size)
    if kind is QuestionKind.COUNT:
        total = sum(scene.count for o in objs if (not colors or o.color == colors[0])
                    and (not shapes or o.shape == shapes[0]))
        return ["zero", "one", "two", "three", "four"][total]
    # The subject of a relation question is the object after "is the" / "does the".
    verb = next((i for i in range(len(words) - 1)
                 if words[i] in ("is", "does") and words[i + 1] == "the"), None)
    first_is_red = verb is None or words[verb + 2] == "red"
    if kind is QuestionKind.RELATION:
        return "left" if first_is_red else "right"
    if "background" in words:
        return "yes" if colors[-1] == scene.background else "no"
    if "left" in words or "right" in words or "above" in words or "below" in words:
        said = "left" if "left" in words else "right" if "right" in words else "other"
        return "yes" if said == ("left" if first_is_red else "right") else "no"
    found = any((not colors or o.color == colors[0]) and (not shapes or o.shape == shapes[0])
                for o in objs)
    return "yes" if found else "no"


def test_held_out_questions_share_no_template_with_training() -> None:
    for kind in QuestionKind:
        assert not set(question_templates("train", kind)) & set(
            question_templates("heldout", kind))


def test_the_vocabulary_covers_every_training_text() -> None:
    words = set(vocabulary())
    rng = random.Random(2)
    for _ in range(500):
        picture = varied_picture(rng)
        qa = sample_qa(picture.scene, picture.placements, rng, "train")
        texts = (qa.question, qa.answer, short_caption(picture.scene),
                 long_caption(picture.scene, picture.placements))
        for text in texts:
            assert set(split_words(text)) <= words, text


def test_the_benchmark_grades_captions_exactly() -> None:
    truth = {}
    for i in range(12):
        picture = varied_picture(random.Random(f"reader-eval-0-{i}"))
        truth[picture.image.tobytes()] = picture.scene

    def oracle(image, prompt: str) -> str:
        return short_caption(truth[image.tobytes()]) if prompt == CAPTION_PROMPT else "no"

    report = evaluate_reader(oracle, n=12, long_captions=False)
    assert report.caption.correct == 12
    assert report.answers.total == 12
    assert sum(r.total for r in report.by_kind.values()) == 12
    wrong = evaluate_reader(lambda image, prompt: "a red circle", n=5, long_captions=False)
    assert wrong.caption.correct == 0 and len(wrong.failures) >= 5
