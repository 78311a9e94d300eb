"""A learning curve: scene-checker accuracy against training steps.

    python -m toile.train.curve --run runs/toile-mini [--n 60] [--steps 20] [--guidance 4]

Grades every snapshot of a run (``OUT/snapshots/step-N``, written by ``toile train
--snapshot-every N``; checkpoints have the same EMA layout and can be passed with ``--from``)
on the same fixed prompt set, so the points are comparable, and writes
``OUT/learning_curve.json``, which the model card shows. Each snapshot's grade is cached in the
snapshot folder under a name that spells out the settings, so adding snapshots and rerunning
only grades the new ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toile.train.config import TrainConfig

CURVE_FILE = "learning_curve.json"


@dataclass(frozen=True)
class CurveSettings:
    """What every point of one curve is graded with (all points share them)."""

    n: int = 60
    seed: int = 0
    steps: int = 20
    guidance: float = 4.0
    phrasing: str = "train"

    def cache_name(self) -> str:
        return (f"eval-n{self.n}-seed{self.seed}-steps{self.steps}-g{self.guidance:g}-"
                f"{self.phrasing}.json")


@dataclass(frozen=True)
class CurvePoint:
    step: int
    images_seen: int  # step × per-process batch (× processes, for multi-process runs)
    train_minutes: float
    accuracy: float
    by_kind: dict[str, float]
    # Per aspect (background, objects, size, count, relation): the fraction of images that got
    # it right. Finer-grained than pass/fail, so early progress shows before whole scenes pass.
    aspects: dict[str, float]


def find_snapshots(folder: Path) -> list[Path]:
    """``step-N`` folders holding EMA weights and state.json, in step order."""
    found = [
        p for p in Path(folder).glob("step-*")
        if p.is_dir() and (p / "ema.safetensors").is_file() and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def grade_snapshot(snapshot: Path, settings: CurveSettings) -> CurvePoint:
    """Scene-checker accuracy of one snapshot's EMA weights (cached in the snapshot folder)."""
    from toile.train.export import load_ema_pipeline, scene_eval

    state = json.loads((snapshot / "state.json").read_text())
    config = TrainConfig.from_dict(state["config"])
    cache = snapshot / settings.cache_name()
    if cache.is_file():
        metrics = json.loads(cache.read_text())
    else:
        pipe = load_ema_pipeline(snapshot, config)
        metrics = scene_eval(pipe, settings.n, steps=settings.steps, guidance=settings.guidance,
                             seed=settings.seed, phrasing=settings.phrasing)
        cache.write_text(json.dumps(metrics, indent=2) + "\n")
    step = int(state["step"])
    return CurvePoint(
        step=step,
        images_seen=step * config.batch_size,
        train_minutes=round(float(state.get("train_seconds", 0.0)) / 60, 1),
        accuracy=float(metrics["pass_rate"]),
        by_kind={k: float(v) for k, v in metrics["by_kind"].items()},
        aspects={k: round(1 - v / metrics["prompts"], 3) for k, v in metrics["failures"].items()},
    )


def learning_curve(
    run_dir: Path, settings: CurveSettings, *, source: Path | None = None, every: int = 1,
    progress: bool = True,
) -> list[CurvePoint]:
    """Grade the snapshots of ``run_dir`` (or of ``source``) whose step is a multiple of
    ``every``, and write ``learning_curve.json``."""
    run_dir = Path(run_dir)
    found = find_snapshots(source or run_dir / "snapshots")
    # Every ``every`` steps, and always the newest: where the run ended matters most.
    snapshots = [p for p in found
                 if int(p.name.split("-")[1]) % every == 0 or p == found[-1]]
    if not snapshots:
        where = source or run_dir / "snapshots"
        raise FileNotFoundError(
            f"no snapshots under {where}; train with --snapshot-every N to keep them"
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(snapshots), desc="curve", unit="snapshot", dynamic_ncols=True)
    points = []
    for snapshot in snapshots:
        points.append(grade_snapshot(snapshot, settings))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(step=points[-1].step, acc=f"{points[-1].accuracy:.2f}")
    if bar is not None:
        bar.close()
    payload = {"settings": asdict(settings), "points": [asdict(p) for p in points]}
    (run_dir / CURVE_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return points


def markdown_table(points: list[CurvePoint]) -> str:
    """The curve as a Markdown table (one row per snapshot)."""
    from toile.evaluate.scene_eval import CATEGORIES

    seen = {k for p in points for k in p.by_kind}
    kinds = [k for k in CATEGORIES if k in seen] + sorted(seen - set(CATEGORIES))
    aspects = [a for a in ("background", "objects") if any(a in p.aspects for p in points)]
    head = ["step", "images seen", "train min", "overall", *kinds, *(f"{a} right" for a in aspects)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [str(p.step), f"{p.images_seen:,}", f"{p.train_minutes:g}",
                 f"{p.accuracy:.3f}", *(f"{p.by_kind.get(k, float('nan')):.3f}" for k in kinds),
                 *(f"{p.aspects.get(a, float('nan')):.3f}" for a in aspects)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_curve(run_dir: Path) -> tuple[CurveSettings, list[CurvePoint]] | None:
    """The curve ``learning_curve`` last wrote for ``run_dir``, if any."""
    path = Path(run_dir) / CURVE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return CurveSettings(**data["settings"]), [CurvePoint(**p) for p in data["points"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toile.train.curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="training run folder")
    parser.add_argument("--from", dest="source", type=Path,
                        help="folder of step-N snapshots (default: RUN/snapshots)")
    defaults = CurveSettings()
    parser.add_argument("--every", type=int, default=1, metavar="STEPS",
                        help="grade snapshots at multiples of this step, and the newest "
                        "(default: all)")
    parser.add_argument("--n", type=int, default=defaults.n, help="prompts per snapshot")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=defaults.guidance)
    parser.add_argument("--phrasing", choices=("train", "heldout"), default=defaults.phrasing)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args(argv)
    if min(args.n, args.steps, args.every) < 1:
        print("toile curve: error: --n, --steps and --every must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = CurveSettings(n=args.n, seed=args.seed, steps=args.steps,
                             guidance=args.guidance, phrasing=args.phrasing)
    try:
        points = learning_curve(args.run, settings, source=args.source, every=args.every)
    except FileNotFoundError as exc:
        print(f"toile curve: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(points))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
