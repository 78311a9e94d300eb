"""AUTOMATIC1111's prompt syntax: emphasis weights, ``BREAK``, prompt editing and alternation.

Emphasis, as A1111 reads it (its wiki, "Features: Attention/emphasis"):

- ``(words)`` multiplies the attention on ``words`` by 1.1, ``[words]`` divides it by 1.1,
  nested groups multiply: ``((words))`` is 1.21;
- ``(words:1.5)`` sets the factor to 1.5 (still multiplied by any enclosing group);
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; an unmatched closing
  bracket is literal text, an unclosed opening one applies to the end of the prompt;
- ``BREAK`` (upper case, a word of its own) ends the current 75-token chunk.

Written by hand because no well-kept library reads this grammar: compel has its own syntax
(``word++``, ``(word)1.2``), and A1111's parser lives inside its web UI.

Prompt editing and alternation, as A1111 reads them (its wiki, "Features: Prompt editing" and
"Alternating words"; its ``prompt_parser.get_learned_conditioning_prompt_schedules``), change the
prompt while sampling runs. Steps are counted from 1:

- ``[from:to:when]`` uses ``from`` for the steps up to and including ``when``, then ``to``;
  ``[to:when]`` adds ``to`` after ``when``, ``[from::when]`` removes ``from`` after ``when``;
- ``when`` written with a decimal point is a fraction of the steps, ``int(when * steps)`` (``0.5``
  halfway, ``1.0`` never switches); an integer is a step number; either is capped at ``steps``
  (A1111's rule since 1.6; its "old scheduling" option reads any ``when`` < 1 as a fraction,
  any other as a step number);
- ``[a|b|c]`` uses alternative ``(step - 1) % 3`` at each step (``[fe|]male``: an empty one too);
- they nest (``[a:[b|c]:2]``) and hold emphasis (``[(cat:1.2)|dog]``): each step's text is then
  read for emphasis as above;
- a square bracket holding a ``:`` or ``|`` at its own level that is neither form (``[a:b]``,
  ``[a|b:2]``) is refused, never kept as literal text (A1111 would silently keep the whole prompt
  as text); an unclosed ``[`` is literal, as in A1111.

``prompt_schedule`` turns a prompt into the text of each run of steps; the families that can
switch the conditioning during sampling follow it, the others refuse such prompts
(``toile.engine.records``).
In img2img the k-th step that runs uses step k of the schedule (A1111 counts the steps that run,
the schedule spans the requested ``steps``); a second-order sampler's evaluations within one step
share that step's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeVar

from toile.errors import RequestError

_T = TypeVar("_T")
EMPHASIS = 1.1
BREAK = "BREAK"
_TOKEN = re.compile(
    r"""
    \\[\\()\[\]]                          # an escaped bracket or backslash
    | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)  # ":1.5)" closes a weighted group
    | [()\[\]]                            # brackets
    | \bBREAK\b                           # chunk break
    | [^\\()\[\]:B]+ | [\\:B]              # plain text (B and : one at a time, see above)
    """,
    re.VERBOSE,
)
# Square brackets holding a ":" (prompt editing) or a "|" (alternation), not escaped.
_EDITING = re.compile(r"(?<!\\)\[(?:[^\[\]\\]|\\.)*[:|](?:[^\[\]\\]|\\.)*(?<!\\)\]")
_SYNTAX = re.compile(r"(?<!\\)[()\[\]]|\bBREAK\b|\\[\\()\[\]]")


@dataclass(frozen=True)
class Piece:
    """A run of prompt text with one weight; ``text == BREAK`` with weight -1 marks a break."""

    text: str
    weight: float

    @property
    def is_break(self) -> bool:
        return self.weight == -1.0 and self.text == BREAK


def has_syntax(prompt: str) -> bool:
    """Whether ``prompt`` uses any emphasis, escape or BREAK (plain prompts go to the pipelines
    untouched, exactly as diffusers would take them)."""
    return bool(_SYNTAX.search(prompt))


def check_supported(prompt: str, field: str = "prompt") -> None:
    """Refuse a square bracket that looks like prompt editing or alternation but is neither (a
    ``:`` or ``|`` at its own level, not the two forms), rather than keep it as literal text."""
    _editing_nodes(prompt, field)


def has_editing(prompt: str) -> bool:
    """Whether ``prompt`` uses prompt editing or alternation (or something refused as such)."""
    try:
        return any(not isinstance(node, str) for node in _editing_nodes(prompt))
    except RequestError:
        return True


def prompt_schedule(prompt: str, steps: int, field: str = "prompt") -> list[tuple[int, str]]:
    """(last step, text) for each run of steps with one text, steps counted from 1, ending at
    ``steps``; the texts keep their emphasis. A prompt without editing is one run, as written."""
    return _merged(_per_step(prompt, steps, field))


def joint_schedule(
    prompt: str, negative: str, steps: int
) -> list[tuple[int, str, str]]:
    """(last step, prompt text, negative text) for each run of steps where neither changes."""
    pairs = zip(_per_step(prompt, steps, "prompt"), _per_step(negative, steps, "negative_prompt"),
                strict=True)
    return [(end, *pair) for end, pair in _merged(list(pairs))]


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The schedule's text at ``step`` (past the end: the last one's)."""
    return next((text for end, text in schedule if step <= end), schedule[-1][1])


def _per_step(prompt: str, steps: int, field: str) -> list[str]:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    nodes = _editing_nodes(prompt, field)
    if all(isinstance(node, str) for node in nodes):
        return [prompt] * steps
    return [_render(nodes, step, steps) for step in range(1, steps + 1)]


def _merged(per_step: list[_T]) -> list[tuple[int, _T]]:
    """Consecutive equal values as (last step, value) runs."""
    runs: list[tuple[int, _T]] = []
    for step, value in enumerate(per_step, start=1):
        if runs and runs[-1][1] == value:
            runs[-1] = (step, value)
        else:
            runs.append((step, value))
    return runs


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``when`` as written (a decimal point makes it a fraction)."""

    before: tuple[_Node, ...]
    after: tuple[_Node, ...]
    when: str


@dataclass(frozen=True)
class _Alternation:
    options: tuple[tuple[_Node, ...], ...]


_Node = str | _Edit | _Alternation
_NUMBER = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)\s*")
_PLAIN = re.compile(r"[^\\\[\]():|]+")  # text with no character the grammar looks at


class _Malformed(Exception):
    def __init__(self, start: int) -> None:
        self.start = start


def _editing_nodes(prompt: str, field: str = "prompt") -> list[_Node]:
    """The prompt as literal text and editing / alternation nodes (emphasis stays text)."""
    reader = _Reader(prompt)
    try:
        return reader.sequence("")
    except _Malformed as exc:
        snippet = prompt[exc.start:exc.start + 60]
        raise RequestError(
            field,
            f"{snippet!r} is neither A1111's prompt editing [from:to:when] (when: a step number "
            "or a fraction like 0.5) nor its alternation [a|b]; fix it or escape literal "
            "brackets as \\[ \\]",
        ) from None


def _render(nodes: tuple[_Node, ...] | list[_Node], step: int, steps: int) -> str:
    """The text of ``nodes`` at ``step`` (1-based) of ``steps``."""
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            chosen = node.before if step <= _when_step(node.when, steps) else node.after
            parts.append(_render(chosen, step, steps))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(parts)


def _when_step(when: str, steps: int) -> int:
    """The last step of an edit's first part (A1111: a decimal point makes it a fraction)."""
    value = float(when) * steps if "." in when else float(when)
    return min(steps, int(value))


class _Reader:
    """Recursive descent over A1111's schedule grammar; emphasis brackets stay literal text
    (with anything nested in them), to be read for weights once each step's text is known."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def sequence(self, stops: str) -> list[_Node]:
        """Nodes up to (not including) a character of ``stops`` or the end."""
        nodes: list[_Node] = []
        text = self.text
        while self.pos < len(text) and text[self.pos] not in stops:
            char = text[self.pos]
            if char == "\\":  # an escaped character stays escaped for the emphasis parser
                nodes.append(text[self.pos:self.pos + 2])
                self.pos += 2
            elif char == "[":
                nodes += self.square()
            elif char == "(":
                nodes += self.round()
            else:
                plain = _PLAIN.match(text, self.pos)
                end = plain.end() if plain else self.pos + 1
                nodes.append(text[self.pos:end])
                self.pos = end
        return nodes

    def round(self) -> list[_Node]:
        """``(...)`` emphasis, kept as text around what it holds; unclosed: a literal ``(``."""
        start = self.pos
        self.pos += 1
        inner = self.sequence(")")
        if self.pos >= len(self.text):
            self.pos = start + 1
            return ["("]
        self.pos += 1
        return ["(", *inner, ")"]

    def square(self) -> list[_Node]:
        """``[...]``: emphasis, editing or alternation; unclosed: a literal ``[``."""
        start = self.pos
        self.pos += 1
        parts = [self.sequence(":|]")]
        separators = ""
        while self.pos < len(self.text) and self.text[self.pos] != "]":
            separators += self.text[self.pos]
            self.pos += 1
            parts.append(self.sequence(":|]"))
        if self.pos >= len(self.text):
            self.pos = start + 1
            return ["["]
        self.pos += 1
        if not separators:
            return ["[", *parts[0], "]"]
        if set(separators) == {"|"}:
            return [_Alternation(tuple(tuple(part) for part in parts))]
        if separators in (":", "::") and _is_number(parts[-1]):
            before = tuple(parts[0]) if separators == "::" else ()
            after = tuple(parts[1] if separators == "::" else parts[0])
            return [_Edit(before, after, "".join(parts[-1]).strip())]  # type: ignore[arg-type]
        raise _Malformed(start)


def _is_number(nodes: list[_Node]) -> bool:
    return all(isinstance(node, str) for node in nodes) and bool(
        _NUMBER.fullmatch("".join(nodes))  # type: ignore[arg-type]
    )


def parse(prompt: str) -> list[Piece]:
    """The prompt as weighted pieces, neighbours with equal weights merged."""
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] != -1.0:
                piece[1] *= factor

    for match in _TOKEN.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            multiply(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply(open_round.pop(), EMPHASIS)
        elif token == "]" and open_square:
            multiply(open_square.pop(), 1 / EMPHASIS)
        elif token == BREAK:
            pieces.append([BREAK, -1.0])
        else:
            pieces.append([token, 1.0])
    for start in open_round:
        multiply(start, EMPHASIS)
    for start in open_square:
        multiply(start, 1 / EMPHASIS)
    merged: list[Piece] = []
    for text, weight in pieces:
        if merged and merged[-1].weight == weight and weight != -1.0:
            merged[-1] = Piece(merged[-1].text + text, weight)
        else:
            merged.append(Piece(text, weight))
    return merged or [Piece("", 1.0)]


def plain_text(prompt: str) -> str:
    """The prompt's words without any syntax (for encoders that take no weights: T5, toile's
    sentence encoder): weights dropped, BREAK as a space."""
    text = "".join(" " if piece.is_break else piece.text for piece in parse(prompt))
    return re.sub(r"\s+", " ", text).strip()
