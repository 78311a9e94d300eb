"""AUTOMATIC1111's prompt syntax: emphasis weights, ``BREAK``, and what toile refuses.

Emphasis, as A1111 reads it (its wiki, "Features: Attention/emphasis"):

- ``(words)`` multiplies the attention on ``words`` by 1.1, ``[words]`` divides it by 1.1,
  nested groups multiply: ``((words))`` is 1.21;
- ``(words:1.5)`` sets the factor to 1.5 (still multiplied by any enclosing group);
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; an unmatched closing
  bracket is literal text, an unclosed opening one applies to the end of the prompt;
- ``BREAK`` (upper case, a word of its own) ends the current 75-token chunk.

Written by hand because no well-kept library reads this grammar: compel has its own syntax
(``word++``, ``(word)1.2``), and A1111's parser lives inside its web UI.

Prompt editing (``[from:to:when]``) and alternation (``[a|b]``) change the conditioning during
sampling; toile does not do that yet, so they are refused with a clear error rather than kept as
literal text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from toile.errors import RequestError

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
    """Refuse A1111's prompt editing and alternation, which toile does not run yet."""
    match = _EDITING.search(prompt)
    if match:
        kind = "alternation [a|b]" if "|" in match.group(0) else "prompt editing [from:to:when]"
        raise RequestError(
            field,
            f"{match.group(0)!r} is A1111's {kind}, which toile does not support yet; remove it "
            "(escape literal brackets as \\[ \\])",
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
