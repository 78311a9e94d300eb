"""Parsing prompts back into scenes: the inverse of :func:`toile.data.scenes.caption`.

``parse_prompt(caption(scene, rng, p)) == scene`` holds exactly for every scene
:func:`toile.data.scenes.sample_scene` makes, with either phrasing; user prompts inside the scene
world parse too ("two blue squares on a yellow backdrop"), and anything else gives ``None``. The
scene benchmark uses it to know what a prompt asks for.

A small keyword parser, not a grammar: it finds the background phrase, the object mentions
(shape words with their colour, size and number modifiers) and a relation keyword, and gives
``None`` for anything ambiguous or outside the vocabulary (see :func:`parse_prompt`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

from toile.data.scenes import ALL_COLORS, ALL_SHAPES, MAX_COUNT, SIZES, Scene, SceneObject
from toile.errors import RequestError

_BACKGROUND_NOUNS = frozenset({"background", "backdrop", "field", "canvas"})
_ARTICLES = frozenset({"a", "an", "the", "plain", "solid"})
_NUMBERS = MappingProxyType(
    {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4}
    | {str(n): n for n in range(1, MAX_COUNT + 1)}
)
_SHAPE_WORDS = MappingProxyType({s: s for s in ALL_SHAPES} | {s + "s": s for s in ALL_SHAPES})
# Words that may stand between a number and the shape: "three small red circles".
_MODIFIERS = frozenset(ALL_COLORS) | frozenset(SIZES) | frozenset(_NUMBERS) | {"the"}
# Relation keywords -> relation; a following "of it" / "it" or a preceding "its" means the
# relation is said from the reference's side ("a blue circle with a red square to its left").
_RELATION_KEYWORDS = MappingProxyType(
    {
        "left": "left of",
        "right": "right of",
        "above": "above",
        "over": "above",
        "below": "below",
        "under": "below",
        "beneath": "below",
        "underneath": "below",
    }
)


@dataclass
class _Mention:
    """An object phrase found in a prompt: where its shape word is, and what modifies it."""

    index: int
    shape: str
    plural: bool
    color: str | None = None
    size: str | None = None
    number: int | None = None


def parse_prompt(text: str) -> Scene | None:
    """Recover the scene a prompt asks for, or ``None`` when it is outside the scene world.

    Understands every caption :func:`caption` writes (both phrasings) and plain prompts such as
    ``"a pink star left of a blue circle"`` or ``"three small red circles on black"``:

    * objects are ``[number] [size] colour shape`` (or ``shape in colour``); plural shapes need
      a number 2-4 ("three", "3"), which may also come later ("red circles, three of them");
    * a background is ``<colour> background|backdrop|field|canvas``, ``background is|of
      <colour>`` or ``on|against <colour>`` not followed by a shape; without one the scene's
      background is ``None`` (not graded);
    * relations: left/right (of), above/over, below/under/beneath/underneath, said from either
      side ("A left of B", "B with A to its left"); sizes left out are ``None`` (not graded).

    Returns ``None`` for anything ambiguous or unsupported: no colour or shape, two colours on
    one object, more than two objects, two objects without a relation, a count above four,
    colours, shapes or counts outside the vocabulary, an object the colour of the background.
    """
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    used = [False] * len(tokens)
    background = _parse_background(tokens, used)
    if background is False:
        return None
    mentions = _parse_mentions(tokens, used)
    relation = _parse_relation(tokens, used)
    if mentions is None or relation is False:
        return None
    try:
        return _build_scene(background, mentions, relation, tokens, used)
    except RequestError:
        return None


def _is_color(tokens: list[str], i: int, used: list[bool]) -> bool:
    return 0 <= i < len(tokens) and tokens[i] in ALL_COLORS and not used[i]


def _parse_background(tokens: list[str], used: list[bool]) -> str | bool | None:
    """The background colour, None if unstated, False if stated twice differently."""
    found: set[str] = set()
    for i, token in enumerate(tokens):
        spans: list[int] = []
        if token in _BACKGROUND_NOUNS and _is_color(tokens, i - 1, used):
            spans = [i - 1, i]  # "blue background"; also claim "over" in "over a blue field"
            before = i - 2
            while before >= 0 and tokens[before] in _ARTICLES:
                before -= 1
            if before >= 0 and tokens[before] in ("on", "over", "against"):
                spans.append(before)
        elif token in _BACKGROUND_NOUNS and i + 1 < len(tokens) and tokens[i + 1] in ("is", "of"):
            j = _skip_articles(tokens, i + 2)
            if _is_color(tokens, j, used) and not _is_object_word(tokens, j + 1):
                spans = [i, j]  # "the background is blue"
        elif token in ("on", "against"):
            j = _skip_articles(tokens, i + 1)
            if _is_color(tokens, j, used) and not _is_object_word(tokens, j + 1):
                spans = [i, j]  # "on blue", "set against white"
        for j in spans:
            used[j] = True
        found |= {tokens[j] for j in spans if tokens[j] in ALL_COLORS}
    if len(found) > 1:
        return False
    return found.pop() if found else None


def _skip_articles(tokens: list[str], i: int) -> int:
    while i < len(tokens) and tokens[i] in _ARTICLES:
        i += 1
    return i


def _is_object_word(tokens: list[str], i: int) -> bool:
    if i >= len(tokens):
        return False
    return tokens[i] in _SHAPE_WORDS or tokens[i] in SIZES or tokens[i] in ALL_COLORS


def _parse_mentions(tokens: list[str], used: list[bool]) -> list[_Mention] | None:
    mentions = []
    for i, token in enumerate(tokens):
        if token not in _SHAPE_WORDS:
            continue
        mention = _Mention(i, _SHAPE_WORDS[token], plural=token != _SHAPE_WORDS[token])
        if not _read_modifiers(tokens, used, mention):
            return None
        mentions.append(mention)
    return mentions


def _read_modifiers(tokens: list[str], used: list[bool], mention: _Mention) -> bool:
    """Fill colour, size and number from the words right before the shape (or "in <colour>"
    right after it); False when they contradict each other."""
    j = mention.index - 1
    while j >= 0 and tokens[j] in _MODIFIERS and not used[j]:
        word = tokens[j]
        if word in ALL_COLORS:
            if mention.color is not None:
                return False
            mention.color = word
        elif word in SIZES:
            if mention.size is not None:
                return False
            mention.size = word
        elif word in _NUMBERS and mention.number is None:
            mention.number = _NUMBERS[word]
        used[j] = True
        j -= 1
    after = mention.index + 1
    in_color = (
        after + 1 < len(tokens) and tokens[after] == "in" and _is_color(tokens, after + 1, used)
    )
    if mention.color is None and in_color:
        mention.color = tokens[after + 1]
        used[after + 1] = True
    used[mention.index] = True
    return True


def _parse_relation(tokens: list[str], used: list[bool]) -> tuple[str, bool, int] | bool | None:
    """(relation, said from the reference's side, token index), None, or False if ambiguous."""
    found = []
    for i, token in enumerate(tokens):
        if token in _RELATION_KEYWORDS and not used[i]:
            following = tokens[i + 1 : i + 4]
            inverse = (i > 0 and tokens[i - 1] == "its") or following[:1] == ["it"]
            inverse = inverse or following[:2] == ["of", "it"] or following == ["side", "of", "it"]
            found.append((_RELATION_KEYWORDS[token], inverse, i))
            used[i] = True
    if len(found) > 1:
        return False
    return found[0] if found else None


def _build_scene(
    background: str | None,
    mentions: list[_Mention],
    relation: tuple[str, bool, int] | None,
    tokens: list[str],
    used: list[bool],
) -> Scene | None:
    if len(mentions) == 1 and relation is None:
        return _build_single_or_count(background, mentions[0], tokens, used)
    if len(mentions) != 2 or relation is None:
        return None
    if any(m.plural or (m.number or 1) != 1 or m.color is None for m in mentions):
        return None
    name, inverse, where = relation
    if inverse:
        reference, subject = mentions  # "it" is the object named first
    else:
        before = [m for m in mentions if m.index < where]
        after = [m for m in mentions if m.index > where]
        if not before or not after:
            return None
        subject, reference = before[-1], after[0]
    objects = tuple(SceneObject(m.shape, m.color, m.size) for m in (subject, reference))
    return Scene("relation", background, objects, relation=name)


def _build_single_or_count(
    background: str | None, mention: _Mention, tokens: list[str], used: list[bool]
) -> Scene | None:
    """One object phrase. A number or size word elsewhere in the prompt belongs to it
    ("red circles, three of them"; "the red circle is small")."""
    if mention.color is None:
        return None
    leftovers = [i for i, t in enumerate(tokens) if not used[i]]
    if mention.number is None:
        numbers = {_NUMBERS[tokens[i]] for i in leftovers if tokens[i] in _NUMBERS}
        if mention.plural:
            numbers.discard(1)  # a stray article ("on a blue background") is not a count
        if len(numbers) > 1:
            return None
        mention.number = numbers.pop() if numbers else None
    if mention.size is None:
        sizes = {tokens[i] for i in leftovers if tokens[i] in SIZES}
        if len(sizes) > 1:
            return None
        mention.size = sizes.pop() if sizes else None
    number = mention.number if mention.number is not None else (None if mention.plural else 1)
    if number is None:
        return None
    obj = SceneObject(mention.shape, mention.color, mention.size)
    if number == 1:
        return Scene("single", background, (obj,))
    return Scene("count", background, (obj,), count=number)
