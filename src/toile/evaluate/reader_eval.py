"""The reader benchmark behind ``toile eval reader``: captions and answers, graded exactly.

Pictures come from :mod:`toile.data.varied_render` under seeds training never draws
(``reader-eval-…`` streams; training uses ``reader-{seed}-{step}``). A caption is right when
the scene parser reads it back to the picture's scene (:func:`same_scene`); an answer is right
when it equals the expected word. Questions cycle through the kinds that apply to each picture,
in ``train`` or ``heldout`` phrasing. Each rate comes with its count and a 95 % interval
half-width (normal approximation), so two runs can be told apart from noise.

Like :mod:`toile.evaluate.scene_eval`, this module never imports the engine: ``read`` is any
``read(image, prompt) -> text`` callable.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from toile.data.reader_text import (
    CAPTION_PROMPT,
    LONG_CAPTION_PROMPT,
    QuestionKind,
    applies,
    same_scene,
    sample_qa,
    split_words,
)
from toile.data.scene_parser import parse_prompt
from toile.data.varied_render import varied_picture
from toile.errors import RequestError

Read = Callable[[Image.Image, str], str]


@dataclass
class Rate:
    correct: int = 0
    total: int = 0

    def add(self, ok: bool) -> None:
        self.correct += int(ok)
        self.total += 1

    @property
    def rate(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def plus_minus(self) -> float:
        p = self.rate
        return 1.96 * math.sqrt(p * (1 - p) / self.total) if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.rate:.3f} ± {self.plus_minus:.3f} (n={self.total})"

    def to_dict(self) -> dict[str, float | int]:
        return {"rate": round(self.rate, 4), "plus_minus": round(self.plus_minus, 4),
                "n": self.total}


@dataclass
class ReaderReport:
    phrasing: str
    caption: Rate = field(default_factory=Rate)
    long_caption: Rate = field(default_factory=Rate)  # its first sentence parses to the scene
    answers: Rate = field(default_factory=Rate)
    by_kind: dict[QuestionKind, Rate] = field(default_factory=lambda: {k: Rate()
                                                                       for k in QuestionKind})
    seconds_caption: list[float] = field(default_factory=list)
    seconds_answer: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "phrasing": self.phrasing,
            "caption": self.caption.to_dict(),
            "long_caption": self.long_caption.to_dict(),
            "answers": self.answers.to_dict(),
            "answers_by_kind": {k.value: r.to_dict() for k, r in self.by_kind.items()},
            "median_seconds": {
                "caption": round(statistics.median(self.seconds_caption), 4)
                if self.seconds_caption else None,
                "answer": round(statistics.median(self.seconds_answer), 4)
                if self.seconds_answer else None},
            "failures": self.failures[:20],
        }

    def lines(self) -> list[str]:
        out = [f"phrasing: {self.phrasing}",
               f"  short caption parses to the scene: {self.caption}",
               f"  long caption's first sentence:     {self.long_caption}",
               f"  answers:                           {self.answers}"]
        out += [f"    {k.value:<9} {r}" for k, r in self.by_kind.items() if r.total]
        if self.seconds_caption:
            out.append(f"  median seconds: caption {statistics.median(self.seconds_caption):.4f}"
                       f", answer {statistics.median(self.seconds_answer):.4f}")
        return out


def normalise_answer(text: str) -> str:
    return " ".join(split_words(text)).strip(" .!")


def evaluate_reader(read: Read, n: int = 200, seed: int = 0, phrasing: str = "heldout",
                    long_captions: bool = True,
                    progress: Callable[[int, int], None] | None = None) -> ReaderReport:
    """Grade ``read`` on ``n`` pictures: a short caption, a long one (unless
    ``long_captions=False``) and one question per picture."""
    if not isinstance(n, int) or n < 1:
        raise RequestError("n", f"must be a positive int; got {n!r}")
    if phrasing not in ("train", "heldout"):
        raise RequestError("phrasing", f"must be 'train' or 'heldout'; got {phrasing!r}")
    report = ReaderReport(phrasing)
    kinds = list(QuestionKind)
    for i in range(n):
        rng = random.Random(f"reader-eval-{seed}-{i}")
        picture = varied_picture(rng)
        started = time.perf_counter()
        text = read(picture.image, CAPTION_PROMPT)
        report.seconds_caption.append(time.perf_counter() - started)
        ok = same_scene(parse_prompt(text), picture.scene)
        report.caption.add(ok)
        if not ok:
            report.failures.append(f"caption {text!r} for {picture.scene}")
        if long_captions:
            first = read(picture.image, LONG_CAPTION_PROMPT).split(".")[0]
            report.long_caption.add(same_scene(parse_prompt(first), picture.scene))
        # Cycle the kinds so each gets its share; skip those that do not apply to the scene.
        kind = next(k for j in range(len(kinds))
                    if applies(k := kinds[(i + j) % len(kinds)], picture.scene))
        qa = sample_qa(picture.scene, picture.placements, rng, phrasing, kind)
        started = time.perf_counter()
        answer = read(picture.image, qa.question)
        report.seconds_answer.append(time.perf_counter() - started)
        ok = normalise_answer(answer) == qa.answer
        report.answers.add(ok)
        report.by_kind[kind].add(ok)
        if not ok:
            report.failures.append(f"{qa.question!r}: said {answer!r}, expected {qa.answer!r}")
        if progress:
            progress(i + 1, n)
    return report
