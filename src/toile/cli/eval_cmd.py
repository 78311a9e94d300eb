"""``toile eval scenes``: prompt-following accuracy on the scene world (GenEval-style)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="benchmarks of output quality")
    sub = p.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)
    scenes = sub.add_parser("scenes", help="grade generated images against scene prompts")
    scenes.add_argument("--model", help="model id or path (default: built-in)")
    scenes.add_argument("--n", type=int, default=200, help="number of prompts (default 200)")
    scenes.add_argument("--seed", type=int, default=0)
    scenes.add_argument(
        "--phrasing",
        choices=("train", "heldout"),
        default="train",
        help="caption templates: those used in training, or held-out ones",
    )
    scenes.add_argument(
        "--concepts",
        choices=("base", "held-out"),
        default="base",
        help="held-out: prompts with the concepts kept out of base training",
    )
    scenes.add_argument("--steps", type=int)
    scenes.add_argument("--guidance", type=float)
    scenes.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]")
    scenes.add_argument("--device", choices=("cpu", "cuda", "mps"))
    scenes.add_argument("--json", action="store_true")
    scenes.set_defaults(run=run_scenes)


def run_scenes(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from toile.engine.engine import Engine
    from toile.errors import RequestError
    from toile.evaluate.scene_eval import evaluate, held_out_prompt_set, prompt_set
    from toile.request import GenerationRequest, LoraSpec

    if args.n < 1:
        raise RequestError("n", f"must be at least 1, got {args.n}")
    build = held_out_prompt_set if args.concepts == "held-out" else prompt_set
    prompts = build(args.n, args.seed, args.phrasing)
    engine = Engine(device=args.device)
    loras = tuple(LoraSpec.parse(text) for text in args.lora)
    fields = {k: getattr(args, k) for k in ("steps", "guidance") if getattr(args, k) is not None}

    def generate(texts: list[str], seeds: list[int]) -> list:
        return [
            engine.run(
                GenerationRequest(text, model=args.model, seed=seed, loras=loras, **fields)
            ).images[0]
            for text, seed in zip(texts, seeds, strict=True)
        ]

    bar = tqdm(total=len(prompts), desc="scenes", unit="img", file=sys.stderr)
    try:
        report = evaluate(
            generate, prompts, seed=args.seed, progress=lambda done, total: bar.update(done - bar.n)
        )
    finally:
        bar.close()
    data = report.to_dict()
    data["model"] = engine.model_info(args.model).id
    data["settings"] = {
        "n": args.n,
        "seed": args.seed,
        "phrasing": args.phrasing,
        "concepts": args.concepts,
        **fields,
    }
    if args.json:
        print(json.dumps(data))
        return 0
    print(
        f"model {data['model']}  ({args.n} prompts, phrasing={args.phrasing}, "
        f"concepts={args.concepts})"
    )
    for name, score in data["categories"].items():
        print(f"  {name:<10} {score['accuracy']:.3f}  ({score['passed']}/{score['total']})")
    print(f"  {'overall':<10} {data['accuracy']:.3f}  ({data['passed']}/{data['total']})")
    print("  failures by aspect: " + ", ".join(f"{k}={v}" for k, v in data["failures"].items()))
    return 0
