"""Training-data governance: what `toile train --data` and `toile finetune --images` leave out.

An opt-out list (TOML) names what its owners asked to keep out of training:

    sha256 = ["9f86d0...", ...]        # exact files (SHA-256 of the file's bytes)
    phash = ["d1c4a0f0e1c3b2a1", ...]  # images, by 64-bit perceptual hash (hex), any re-encoding
    phash_distance = 6                 # Hamming distance still counted as the same image
    terms = ["Jane Doe", ...]          # caption terms, e.g. an artist's name (robust matching)

Caption terms match as the prompt policy matches (case, accents, l33t, spacing and
punctuation inside words, plurals; never inside another word). With an output check
configured (``toile.safety.output_check``), training images it flags are left out too. Each
left-out sample is counted by reason with the loaders' other skips, reported in ``log.jsonl``,
and listed, with the filters, in the model card (``toile train``) or the LoRA's metadata.

Perceptual hashes are ImageHash's pHash (DCT of a 32x32 grey image, 64 bits): a well-kept
library, and the hash other opt-out registries publish.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.errors import ToileError
from toile.safety.policy import Action, Policy, Rule, read_toml

if TYPE_CHECKING:
    from PIL import Image

    from toile.safety.output_check import OutputCheck

REASON_HASH = "opt-out: file hash"
REASON_PHASH = "opt-out: perceptual hash"
REASON_TERM = "opt-out: caption term"
REASON_CHECK = "output check flagged it"


@dataclass(frozen=True)
class OptOut:
    sha256: frozenset[str] = frozenset()
    phash: tuple[int, ...] = ()
    phash_distance: int = 6
    terms: tuple[str, ...] = ()
    source: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> OptOut:
        target = Path(path)
        data = read_toml(target, "opt-out list")
        unknown = set(data) - {"sha256", "phash", "phash_distance", "terms"}
        if unknown:
            raise ToileError(f"opt-out list {target}: unknown key {sorted(unknown)[0]!r}; "
                             "known: sha256, phash, phash_distance, terms")
        hashes = _strings(data, "sha256", target)
        if any(len(h) != 64 or any(c not in "0123456789abcdef" for c in h.lower())
               for h in hashes):
            raise ToileError(f"opt-out list {target}: sha256 entries are 64 hex digits")
        try:
            phashes = tuple(int(h, 16) for h in _strings(data, "phash", target))
        except ValueError:
            raise ToileError(f"opt-out list {target}: phash entries are hex strings") from None
        distance = data.get("phash_distance", 6)
        if isinstance(distance, bool) or not isinstance(distance, int) or not 0 <= distance <= 32:
            raise ToileError(f"opt-out list {target}: phash_distance is an integer in [0, 32]")
        return cls(frozenset(h.lower() for h in hashes), phashes, distance,
                   tuple(_strings(data, "terms", target)), str(target))


def _strings(data: dict[str, Any], key: str, path: Path) -> list[str]:
    values = data.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ToileError(f"opt-out list {path}: {key} must be a list of strings")
    return values


def perceptual_hash(image: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.phash(image)), 16)


@dataclass
class DataFilter:
    """Decides, per training sample, whether it is left out and why (None: kept)."""

    opt_out: OptOut | None = None
    check: OutputCheck | None = None
    _terms: Policy = field(init=False)

    def __post_init__(self) -> None:
        terms = self.opt_out.terms if self.opt_out is not None else ()
        self._terms = Policy([Rule("opt-out", "opt-out", Action.BLOCK, terms)] if terms else [])

    def reason(self, data: bytes, image: Image.Image, caption: str) -> str | None:
        opt_out = self.opt_out
        if opt_out is not None:
            if opt_out.sha256 and hashlib.sha256(data).hexdigest() in opt_out.sha256:
                return REASON_HASH
            if opt_out.phash:
                mine = perceptual_hash(image)
                if any((mine ^ other).bit_count() <= opt_out.phash_distance
                       for other in opt_out.phash):
                    return REASON_PHASH
            if self._terms.check(caption).blocked is not None:
                return REASON_TERM
        if self.check is not None and self.check.check([image])[0].flagged:
            return REASON_CHECK
        return None

    def describe(self) -> dict[str, Any]:
        """For the model card and the run's metadata: which filters ran."""
        found: dict[str, Any] = {}
        if self.opt_out is not None:
            found["opt_out"] = {
                "list": self.opt_out.source, "sha256": len(self.opt_out.sha256),
                "phash": len(self.opt_out.phash), "phash_distance": self.opt_out.phash_distance,
                "terms": len(self.opt_out.terms),
            }
        if self.check is not None:
            found["output_check"] = self.check.name
        return found


def build_filter(opt_out: str | None, checker: str | None) -> DataFilter | None:
    """The filter for a run's settings (None when neither is set)."""
    if opt_out is None and checker is None:
        return None
    from toile.safety.output_check import load_output_check

    return DataFilter(OptOut.from_file(opt_out) if opt_out else None,
                      load_output_check(checker) if checker else None)
