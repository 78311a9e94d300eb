"""The prompt policy: rules that block or warn about prompts, matched robustly and explained.

Rules live in TOML (``[[rule]]`` tables: ``id``, ``category``, ``action`` = ``"block"`` or
``"warn"``, ``terms`` and/or ``patterns``). toile ships a default file
(``assets/policy/default.toml``); a deployment's file adds rules, overrides a default rule by
using its id, or replaces the defaults with ``replace_defaults = true``.

Matching is on a normalised copy of the text, every character mapped back to the original so a
verdict can show the span it matched:

- Unicode compatibility forms folded (NFKC), accents removed (NFKD without combining marks),
  case folded; zero-width characters and soft hyphens dropped;
- common l33t substitutions read as letters (``0``→o, ``1``→i, ``3``→e, ``4``/``@``→a,
  ``5``/``$``→s, ``7``→t, ``!``→i, ``|``→l, ``8``→b);
- a *term* matches letters in sequence across spaces and punctuation inside a word
  (``l.o.l.i``, ``l o l i``), but only from a word's start to a word's end, so a term never
  matches inside a longer word (no "Scunthorpe" problem); a plural ``s``/``es`` may follow;
- a *pattern* is a regular expression over the normalised text (spaces kept, punctuation kept).

The rule's terms and patterns are never shown to clients: a refusal names the rule id and its
category only.
"""

from __future__ import annotations

import functools
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from toile.errors import RequestError, ToileError

ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"), None)
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "@": "a", "5": "s", "$": "s",
                      "7": "t", "!": "i", "|": "l", "8": "b"})


class Action(StrEnum):
    BLOCK = "block"
    WARN = "warn"


@dataclass(frozen=True)
class Rule:
    """One policy rule: ``terms`` (plain words or phrases) and ``patterns`` (regexes)."""

    id: str
    category: str
    action: Action
    terms: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

    @functools.cached_property
    def skeletons(self) -> tuple[str, ...]:
        return tuple(s for s in (_skeleton(normalise(t)[0]) for t in self.terms) if s)

    @functools.cached_property
    def compiled(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(p, re.IGNORECASE) for p in self.patterns)


@dataclass(frozen=True)
class Match:
    """Which rule matched where: ``span`` is (start, end) in the text as written."""

    rule: str
    category: str
    action: Action
    span: tuple[int, int]
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "category": self.category, "action": self.action.value,
                "span": list(self.span)}


@dataclass(frozen=True)
class Verdict:
    matches: tuple[Match, ...] = ()

    @property
    def blocked(self) -> Match | None:
        return next((m for m in self.matches if m.action is Action.BLOCK), None)

    @property
    def warnings(self) -> tuple[Match, ...]:
        return tuple(m for m in self.matches if m.action is Action.WARN)


class PolicyError(RequestError):
    """A prompt a policy rule blocks. ``rule`` is the rule's id."""

    def __init__(self, field_name: str, match: Match) -> None:
        super().__init__(
            field_name,
            f"refused by the content policy (rule {match.rule}, category {match.category}; "
            f"characters {match.span[0]}-{match.span[1]})",
        )
        self.match = match


def normalise(text: str, *, leet: bool = True) -> tuple[str, list[int]]:
    """The matching form of ``text`` and, for each of its characters, the index in ``text``
    it came from (``leet=False`` keeps digits and symbols as written, for patterns that name
    numbers)."""
    out: list[str] = []
    where: list[int] = []
    for index, char in enumerate(text):
        if ord(char) in ZERO_WIDTH:
            continue
        folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", char))
        for piece in folded:
            if unicodedata.combining(piece):
                continue
            lowered = piece.casefold()
            for lower in lowered.translate(LEET) if leet else lowered:
                out.append(lower)
                where.append(index)
    return "".join(out), where


def _skeleton(text: str) -> str:
    return "".join(c for c in text if c.isalnum())


@dataclass(frozen=True)
class _Letters:
    """The normalised text's letters only, with word starts/ends and the map back."""

    letters: str
    where: list[int]  # letter index -> normalised index
    starts: frozenset[int]
    ends: frozenset[int]


def _letters(normal: str) -> _Letters:
    letters, where, starts, ends = [], [], set(), set()
    previous_alnum = False
    for index, char in enumerate(normal):
        if char.isalnum():
            if not previous_alnum:
                starts.add(len(letters))
            letters.append(char)
            where.append(index)
            previous_alnum = True
        else:
            if previous_alnum:
                ends.add(len(letters))
            previous_alnum = False
    if previous_alnum:
        ends.add(len(letters))
    return _Letters("".join(letters), where, frozenset(starts), frozenset(ends))


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=list)

    @classmethod
    def default(cls) -> Policy:
        """The policy toile ships (``assets/policy/default.toml``), read once per process."""
        return _default_policy()

    @classmethod
    def from_file(cls, path: str | Path, base: Policy | None = None) -> Policy:
        """Rules from a TOML file; with ``base``, added to (or overriding by id, or with
        ``replace_defaults = true`` replacing) the base's rules."""
        target = Path(path)
        data = read_toml(target, "policy file")
        rules = [_rule(item, target, i) for i, item in enumerate(data.get("rule", []))]
        if base is None or data.get("replace_defaults", False):
            return cls(rules)
        own = {rule.id for rule in rules}
        return cls([r for r in base.rules if r.id not in own] + rules)

    def check(self, text: str) -> Verdict:
        """Every rule that matches ``text``, in the order they match."""
        if not text:
            return Verdict()
        normal, where = normalise(text)
        plain, plain_where = normalise(text, leet=False)
        letters = _letters(normal)
        matches: list[Match] = []
        for rule in self.rules:
            found = _term_span(rule, letters) or _pattern_span(rule, normal)
            positions = where
            if found is None:  # patterns also see digits and symbols as written
                found, positions = _pattern_span(rule, plain), plain_where
            if found is not None:
                start, end = positions[found[0]], positions[found[1] - 1] + 1
                matches.append(Match(rule.id, rule.category, rule.action, (start, end),
                                     text[start:end]))
        matches.sort(key=lambda m: m.span)
        return Verdict(tuple(matches))


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file a user gives toile (a policy, an opt-out list), or a one-line ToileError
    naming ``what`` it is and the file."""
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ToileError(f"cannot read the {what} {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ToileError(f"{what} {path} is not valid TOML: {exc}") from None


@functools.cache
def _default_policy() -> Policy:
    from toile.config import builtin_models_dir

    return Policy.from_file(builtin_models_dir() / "policy" / "default.toml")


def enforce(policy: Policy | None, text: str, field_name: str) -> tuple[Match, ...]:
    """Raise PolicyError if a rule blocks ``text``; otherwise its warnings (none without a
    policy)."""
    if policy is None:
        return ()
    verdict = policy.check(text)
    blocked = verdict.blocked
    if blocked is not None:
        raise PolicyError(field_name, blocked)
    return verdict.warnings


def _term_span(rule: Rule, letters: _Letters) -> tuple[int, int] | None:
    """A term's letters from a word start to a word end (a plural s/es allowed): the span in
    the normalised text."""
    for skeleton in rule.skeletons:
        start = letters.letters.find(skeleton)
        while start != -1:
            end = start + len(skeleton)
            if start in letters.starts:
                for extra in ("", "s", "es"):
                    stop = end + len(extra)
                    if letters.letters[end:stop] == extra and stop in letters.ends:
                        return letters.where[start], letters.where[stop - 1] + 1
            start = letters.letters.find(skeleton, start + 1)
    return None


def _pattern_span(rule: Rule, normal: str) -> tuple[int, int] | None:
    for pattern in rule.compiled:
        found = pattern.search(normal)
        if found and found.end() > found.start():
            return found.start(), found.end()
    return None


def _rule(item: Any, path: Path, index: int) -> Rule:
    where = f"{path} rule {index + 1}"
    if not isinstance(item, dict):
        raise ToileError(f"{where}: each [[rule]] must be a table")
    rule_id = item.get("id")
    if not isinstance(rule_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", rule_id):
        raise ToileError(f"{where}: id must be 1-64 letters, digits, '.', '_' or '-'")
    try:
        action = Action(item.get("action", "block"))
    except ValueError:
        raise ToileError(f"{where} ({rule_id}): action must be 'block' or 'warn'") from None
    terms, patterns = item.get("terms", []), item.get("patterns", [])
    for name, values in (("terms", terms), ("patterns", patterns)):
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ToileError(f"{where} ({rule_id}): {name} must be a list of strings")
    if not terms and not patterns:
        raise ToileError(f"{where} ({rule_id}): give terms or patterns")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ToileError(f"{where} ({rule_id}): bad pattern: {exc}") from None
    return Rule(rule_id, str(item.get("category", "other")), action, tuple(terms),
                tuple(patterns))
