"""What a reader model says about a scene-world picture: captions and question/answer pairs.

Captions are written in one canonical form so that :func:`toile.data.scene_parser.parse_prompt`
reads them back to the scene exactly. A relation is stated from its left (or upper) object:
"A to the left of B", never "B to the right of A", so one picture has one caption;
:func:`same_scene` compares scenes up to that choice.

Questions come in two disjoint phrasing sets, as captions do in :mod:`toile.data.scenes`:
``train`` for training and ``heldout`` for measuring how well a model reads wording it never
saw. Answers are short, as in VQA: a colour, a shape, a number word, a direction, yes or no,
small or large.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from types import MappingProxyType

from toile.data.scenes import (
    ALL_COLORS,
    ALL_SHAPES,
    COUNT_WORDS,
    Scene,
    SceneObject,
)
from toile.data.varied_render import SIZE_SPLIT, Placement

NUMBER_WORDS = MappingProxyType({0: "zero", **COUNT_WORDS})
_INVERSE = MappingProxyType({"left of": "right of", "right of": "left of", "above": "below",
                             "below": "above"})
_RELATION_PHRASE = MappingProxyType({"left of": "to the left of", "right of": "to the right of",
                                     "above": "above", "below": "below"})
# The one-word answer for "where is A relative to B?".
RELATION_ANSWER = MappingProxyType({"left of": "left", "right of": "right", "above": "above",
                                    "below": "below"})


class QuestionKind(enum.Enum):
    """What a question asks; evaluation reports one rate per kind."""

    BACKGROUND = "background"  # colour of the background
    COLOR = "color"  # colour of an object
    SHAPE = "shape"  # shape of an object
    COUNT = "count"  # how many of something
    RELATION = "relation"  # where one object is relative to another
    EXISTS = "exists"  # yes/no: is something there, does a relation hold
    SIZE = "size"  # small or large (single objects)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: QuestionKind


# --- captions --------------------------------------------------------------------------------


def canonical(scene: Scene) -> Scene:
    """``scene`` with a relation stated from its left or upper object (see the module doc)."""
    if scene.kind != "relation" or scene.relation in ("left of", "above"):
        return scene
    assert scene.relation is not None
    first, second = scene.objects
    return Scene("relation", scene.background, (second, first), relation=_INVERSE[scene.relation])


def same_scene(a: Scene | None, b: Scene | None) -> bool:
    """True when ``a`` and ``b`` describe the same picture ("A left of B" == "B right of A")."""
    return a is not None and b is not None and canonical(a) == canonical(b)


def _phrase(obj: SceneObject, plural: bool = False) -> str:
    words = (obj.size, obj.color, obj.shape + ("s" if plural else ""))
    return " ".join(w for w in words if w)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def short_caption(scene: Scene) -> str:
    """One sentence stating the whole scene, e.g. ``a small red circle on a blue background``,
    ``a red square to the left of a green circle on a white background``,
    ``three yellow triangles on a black background``."""
    scene = canonical(scene)
    first = scene.objects[0]
    if scene.kind == "count":
        subject = f"{NUMBER_WORDS[scene.count]} {_phrase(first, plural=True)}"
    elif scene.kind == "relation":
        assert scene.relation is not None
        subject = (f"{_article(_phrase(first))} {_RELATION_PHRASE[scene.relation]} "
                   f"{_article(_phrase(scene.objects[1]))}")
    else:
        subject = _article(_phrase(first))
    return f"{subject} on {_article(str(scene.background))} background"


def region(x: float, y: float) -> str:
    """Where a point of the unit canvas is, in a 3x3 grid: ``top left`` ... ``centre``."""
    row = ("top", "middle", "bottom")[min(int(y * 3), 2)]
    col = ("left", "middle", "right")[min(int(x * 3), 2)]
    if row == col == "middle":
        return "centre"
    if row == "middle":
        return f"middle {col}"
    return f"{row} {col}" if col != "middle" else f"{row} middle"


def long_caption(scene: Scene, placements: tuple[Placement, ...], size: int = 64) -> str:
    """The short caption, then each object left to right: where it is and how wide, in pixels
    of a ``size`` canvas. ``a small red circle on a blue background . the red circle is in the
    top left , 14 pixels wide``."""
    parts = [short_caption(scene)]
    for item in sorted(placements, key=lambda p: (p.x, p.y)):
        width = max(1, round(item.extent * size))
        parts.append(f"the {item.obj.color} {item.obj.shape} is in the {region(item.x, item.y)} "
                     f", {width} pixels wide")
    return " . ".join(parts)


def size_word(extent: float) -> str:
    return "small" if extent < SIZE_SPLIT else "large"


# --- questions -------------------------------------------------------------------------------

# Slots: {shape} {shapes} {color} {obj} (colour + shape) {a} {b} (relation objects) {rel}
# (relation phrase) {bg}. ``train`` and ``heldout`` share no template.
_QUESTIONS: MappingProxyType[str, MappingProxyType[QuestionKind, tuple[str, ...]]] = (
    MappingProxyType({
        "train": MappingProxyType({
            QuestionKind.BACKGROUND: (
                "what colour is the background?", "what color is the background?",
                "what is the background colour?", "background color?",
                "which colour is the backdrop?", "what colour is behind the {shape}?",
                "what is the colour of the background?", "the background is what color?",
            ),
            QuestionKind.COLOR: (
                "what colour is the {shape}?", "what color is the {shape}?",
                "what is the colour of the {shape}?", "which color is the {shape}?",
                "the {shape} is what colour?", "colour of the {shape}?",
                "what color are the {shapes}?", "tell me the colour of the {shape}",
            ),
            QuestionKind.SHAPE: (
                "what shape is the {color} object?", "what shape is the {color} thing?",
                "which shape is {color}?", "what is the {color} shape?",
                "the {color} object is what shape?", "what kind of shape is the {color} one?",
                "what shape are the {color} objects?", "name the shape of the {color} object",
            ),
            QuestionKind.COUNT: (
                "how many {shapes} are there?", "how many {color} {shapes} are there?",
                "how many {shapes}?", "how many objects are there?", "how many shapes are there?",
                "count the {shapes}", "how many {color} objects are there?",
                "what is the number of {shapes}?", "how many {color} things can you see?",
            ),
            QuestionKind.RELATION: (
                "where is the {a} relative to the {b}?", "where is the {a} compared to the {b}?",
                "where is the {a} in relation to the {b}?", "where is the {a} with respect to "
                "the {b}?", "what side of the {b} is the {a} on?",
                "how is the {a} placed relative to the {b}?",
            ),
            QuestionKind.EXISTS: (
                "is there a {obj}?", "is there a {obj} in the image?", "is there any {shape}?",
                "are there any {color} objects?", "do you see a {obj}?",
                "is the background {color}?", "is the {a} {rel} the {b}?",
                "is there a {shape} in the picture?", "can you see a {color} {shape}?",
            ),
            QuestionKind.SIZE: (
                "is the {shape} small or large?", "how big is the {shape}?",
                "what size is the {shape}?", "is the {color} object large or small?",
                "is the {shape} big or small?",
            ),
        }),
        "heldout": MappingProxyType({
            QuestionKind.BACKGROUND: (
                "which color fills the background?", "what colour is the canvas behind it all?",
                "could you name the background's colour?",
            ),
            QuestionKind.COLOR: (
                "which colour does the {shape} have?", "the {shape}: what colour?",
                "can you tell me the color of the {shape}?",
            ),
            QuestionKind.SHAPE: (
                "which shape has the colour {color}?", "what is the shape of the {color} object?",
                "the {color} object: what shape is it?",
            ),
            QuestionKind.COUNT: (
                "what number of {shapes} can be seen?", "count how many {color} objects appear",
                "how many {shapes} does the picture contain?",
            ),
            QuestionKind.RELATION: (
                "in which direction from the {b} is the {a}?",
                "the {a} is on which side of the {b}?",
                "relative to the {b}, where does the {a} sit?",
            ),
            QuestionKind.EXISTS: (
                "does the picture contain a {obj}?", "is any {shape} visible?",
                "does the image show a {obj}?", "is the background colour {color}?",
            ),
            QuestionKind.SIZE: (
                "would you call the {shape} small or large?", "the {shape}: large or small?",
            ),
        }),
    })
)
PHRASINGS = tuple(_QUESTIONS)


def question_templates(phrasing: str, kind: QuestionKind) -> tuple[str, ...]:
    return _QUESTIONS[phrasing][kind]


def sample_qa(scene: Scene, placements: tuple[Placement, ...], rng: random.Random,
              phrasing: str = "train", kind: QuestionKind | None = None) -> QA:
    """A question about the picture and its right answer, deterministic for ``rng``."""
    kinds = [k for k in QuestionKind if applies(k, scene)]
    if kind is not None and kind not in kinds:
        raise ValueError(f"no {kind.value} question applies to {scene}")
    kind = kind or rng.choice(kinds)
    # Templates naming two objects ({a}, {b}) ask about relation scenes only.
    template = rng.choice([t for t in _QUESTIONS[phrasing][kind]
                           if "{a}" not in t or scene.kind == "relation"])
    slots, answer = _ANSWERERS[kind](scene, placements, template, rng)
    text = template.format(**slots)
    text = text.replace(" a a", " an a").replace(" a o", " an o")
    return QA(text, answer, kind)


Slots = dict[str, str]


def applies(kind: QuestionKind, scene: Scene) -> bool:
    """Whether a question of ``kind`` has one right answer for ``scene``: object colours are
    asked by a shape no other object has, shapes by a colour no other object has."""
    if kind is QuestionKind.SIZE:
        return scene.kind == "single"
    if kind is QuestionKind.RELATION:
        return scene.kind == "relation"
    if kind is QuestionKind.COLOR:
        return bool(_unique(scene, "shape"))
    if kind is QuestionKind.SHAPE:
        return bool(_unique(scene, "color"))
    return True


def _obj_slots(obj: SceneObject) -> Slots:
    return {"shape": obj.shape, "shapes": obj.shape + "s", "color": obj.color,
            "obj": f"{obj.color} {obj.shape}"}


def _unique(scene: Scene, field: str) -> list[SceneObject]:
    """Objects whose ``field`` (shape or color) no other object in the scene shares."""
    values = [getattr(o, field) for o in scene.objects]
    return [o for o in scene.objects if values.count(getattr(o, field)) == 1]


def _answer_background(scene: Scene, _p: tuple[Placement, ...], _t: str,
                       rng: random.Random) -> tuple[Slots, str]:
    return _obj_slots(rng.choice(scene.objects)), str(scene.background)


def _answer_color(scene: Scene, _p: tuple[Placement, ...], _t: str,
                  rng: random.Random) -> tuple[Slots, str]:
    obj = rng.choice(_unique(scene, "shape"))
    return _obj_slots(obj), obj.color


def _answer_shape(scene: Scene, _p: tuple[Placement, ...], _t: str,
                  rng: random.Random) -> tuple[Slots, str]:
    obj = rng.choice(_unique(scene, "color"))
    return _obj_slots(obj), obj.shape


def _answer_count(scene: Scene, _p: tuple[Placement, ...], template: str,
                  rng: random.Random) -> tuple[Slots, str]:
    """Counts of a present or absent shape, colour, or colour + shape, and of all objects."""
    obj = rng.choice(scene.objects) if rng.random() < 0.7 else SceneObject(
        rng.choice(ALL_SHAPES), rng.choice([c for c in ALL_COLORS if c != scene.background]))
    slots = _obj_slots(obj)
    has_color, has_shape = "{color}" in template, "{shape" in template
    total = sum(
        scene.count for o in scene.objects
        if (not has_color or o.color == obj.color) and (not has_shape or o.shape == obj.shape))
    return slots, NUMBER_WORDS.get(total, str(total))


def _answer_relation(scene: Scene, _p: tuple[Placement, ...], _t: str,
                     rng: random.Random) -> tuple[Slots, str]:
    slots, relation = _relation_pair(scene, rng)
    return slots, RELATION_ANSWER[relation]


def _relation_pair(scene: Scene, rng: random.Random) -> tuple[Slots, str]:
    """Slots ``a``/``b``/``rel`` for the two objects of a relation scene, either way round."""
    assert scene.kind == "relation" and scene.relation is not None
    a, b = scene.objects
    relation = scene.relation
    if rng.random() < 0.5:
        a, b, relation = b, a, _INVERSE[relation]
    names = {"a": f"{a.color} {a.shape}", "b": f"{b.color} {b.shape}"}
    return _obj_slots(a) | names | {"rel": _RELATION_PHRASE[relation]}, relation


def _answer_exists(scene: Scene, _p: tuple[Placement, ...], template: str,
                   rng: random.Random) -> tuple[Slots, str]:
    if "{a}" in template:
        slots, relation = _relation_pair(scene, rng)
        if rng.random() < 0.5:
            slots["rel"] = _RELATION_PHRASE[rng.choice(
                [r for r in _RELATION_PHRASE if r != relation])]
            return slots, "no"
        return slots, "yes"
    if "background" in template:
        color = scene.background if rng.random() < 0.5 else rng.choice(ALL_COLORS)
        return {"color": str(color)}, "yes" if color == scene.background else "no"
    present = rng.random() < 0.5
    obj = rng.choice(scene.objects) if present else SceneObject(
        rng.choice(ALL_SHAPES), rng.choice(ALL_COLORS))
    slots = _obj_slots(obj)
    asks_color = "{color}" in template or "{obj}" in template
    asks_shape = "{shape}" in template or "{obj}" in template
    found = any((o.color == obj.color or not asks_color)
                and (o.shape == obj.shape or not asks_shape) for o in scene.objects)
    return slots, "yes" if found else "no"


def _answer_size(scene: Scene, placements: tuple[Placement, ...], _t: str,
                 _rng: random.Random) -> tuple[Slots, str]:
    obj = scene.objects[0]
    return _obj_slots(obj), obj.size or size_word(placements[0].extent)


_ANSWERERS = MappingProxyType({
    QuestionKind.BACKGROUND: _answer_background,
    QuestionKind.COLOR: _answer_color,
    QuestionKind.SHAPE: _answer_shape,
    QuestionKind.COUNT: _answer_count,
    QuestionKind.RELATION: _answer_relation,
    QuestionKind.EXISTS: _answer_exists,
    QuestionKind.SIZE: _answer_size,
})


# --- vocabulary ------------------------------------------------------------------------------

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[SEP]", "[EOS]")
CAPTION_PROMPT = "caption"
LONG_CAPTION_PROMPT = "describe in detail"


def split_words(text: str) -> list[str]:
    """Lower-case words and punctuation marks, the way the reader's tokenizer splits them
    (``tokenizers``' ``Whitespace`` pre-tokenizer: ``\\w+|[^\\w\\s]+``)."""
    import re

    return re.findall(r"\w+|[^\w\s]+", text.lower())


def vocabulary() -> list[str]:
    """Every word the reader is trained to read or write: the ``train`` question templates,
    the caption forms and their slot values. Words only the held-out templates use are left
    out on purpose (they read as ``[UNK]``, as any unknown word does)."""
    words: set[str] = set()
    for template in (t for table in (_QUESTIONS["train"],) for ts in table.values() for t in ts):
        words.update(split_words(template.replace("{", " ").replace("}", " ")))
    words -= {"shape", "shapes", "color", "obj", "a", "b", "rel", "bg"}  # slot names ...
    words.update(("shape", "shapes", "color", "a", "an"))  # ... some of which are words too
    words.update(ALL_COLORS)
    words.update(ALL_SHAPES)
    words.update(s + "s" for s in ALL_SHAPES)
    words.update(NUMBER_WORDS.values())
    words.update(str(n) for n in range(65))
    words.update(("small", "large", "yes", "no", "on", "background", "to", "the", "of", "left",
                  "right", "above", "below", "is", "in", "top", "middle", "bottom", "centre",
                  "pixels", "wide", ".", ",", "?", "'"))
    words.update(split_words(CAPTION_PROMPT + " " + LONG_CAPTION_PROMPT))
    return [*SPECIALS, *sorted(words)]
