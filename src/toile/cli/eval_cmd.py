"""``toile eval scenes``: prompt-following accuracy on the scene world (GenEval-style);
``toile eval reader``: captions and answers of a reader model, graded exactly."""

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

    reader = sub.add_parser(
        "reader", help="grade a reader's captions and answers on scene-world pictures",
        description="Draws pictures with other renderers' variety (hues, sizes, canvas sizes, "
        "edges, noise; seeds training never uses), asks the model for a short caption, a long "
        "one and one question per picture, and reports the rate of captions the scene parser "
        "reads back to the true scene and of right answers, per question kind, each with its "
        "count and 95 %% interval.")
    reader.add_argument("--model", help="model id or path (default: the caption task's)")
    reader.add_argument("--n", type=int, default=200, help="number of pictures (default 200)")
    reader.add_argument("--seed", type=int, default=0)
    reader.add_argument("--phrasing", choices=("train", "heldout", "both"), default="both",
                        help="question templates: training's, held-out ones, or both")
    reader.add_argument("--device", choices=("cpu", "cuda", "mps"))
    reader.add_argument("--json", action="store_true")
    reader.set_defaults(run=run_reader)

    sr = sub.add_parser(
        "sr", help="an upscaler against Lanczos and bicubic on the same 64² images",
        description="Takes the same 64² scene-world images (renders, or with --generated "
        "toile-mini's own) to 256² with the model and with Lanczos and bicubic resizing; "
        "reports the scene checker's pass rate on each result, PSNR against the true 256² "
        "render, the 10-90%% edge transition width and a no-reference sharpness (RMS gradient).")
    sr.add_argument("--model", help="upscaler model id or path (default: the upscale task's)")
    sr.add_argument("--n", type=int, default=100, help="number of scenes (default 100)")
    sr.add_argument("--seed", type=int, default=0)
    sr.add_argument("--generated", action="store_true",
                    help="bases are toile-mini's 64² images for the scenes' captions")
    sr.add_argument("--device", choices=("cpu", "cuda", "mps"))
    sr.add_argument("--json", action="store_true")
    sr.set_defaults(run=run_sr)


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


def run_reader(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from toile.engine.engine import Engine
    from toile.evaluate.reader_eval import evaluate_reader
    from toile.request import Detail, GenerationRequest, Task

    engine = Engine(device=args.device)
    model = args.model or engine.default_model(Task.CAPTION)

    def read(image, prompt: str) -> str:  # the engine's own path, as a user's request runs
        from toile.data.reader_text import CAPTION_PROMPT, LONG_CAPTION_PROMPT

        if prompt in (CAPTION_PROMPT, LONG_CAPTION_PROMPT):
            detail = Detail.LONG if prompt == LONG_CAPTION_PROMPT else Detail.SHORT
            request = GenerationRequest("", task=Task.CAPTION, image=image, detail=detail,
                                        model=model)
        else:
            request = GenerationRequest("", task=Task.ANSWER, image=image, question=prompt,
                                        model=model)
        return engine.run(request).texts[0]

    phrasings = ("train", "heldout") if args.phrasing == "both" else (args.phrasing,)
    reports = []
    for phrasing in phrasings:
        bar = tqdm(total=args.n, desc=f"reader ({phrasing})", unit="img", file=sys.stderr)
        try:
            reports.append(evaluate_reader(
                read, n=args.n, seed=args.seed, phrasing=phrasing,
                progress=lambda done, total, bar=bar: bar.update(done - bar.n)))
        finally:
            bar.close()
    info = engine.model_info(model)
    if args.json:
        print(json.dumps({"model": info.id, "n": args.n, "seed": args.seed,
                          "reports": [r.to_dict() for r in reports]}))
        return 0
    print(f"model {info.id}  ({args.n} pictures, seed {args.seed})")
    for report in reports:
        print("\n".join(report.lines()))
    return 0


def run_sr(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    from toile.engine.engine import Engine
    from toile.errors import RequestError
    from toile.evaluate.sr_eval import evaluate_sr, resize_method
    from toile.request import GenerationRequest, Task

    if args.n < 1:
        raise RequestError("n", f"must be at least 1, got {args.n}")
    engine = Engine(device=args.device)
    model = args.model or engine.default_model(Task.UPSCALE)

    def upscale(images, prompts):
        return [engine.run(GenerationRequest(prompt, task=Task.UPSCALE, image=image, scale=4,
                                             model=model)).images[0]
                for image, prompt in zip(images, prompts, strict=True)]

    def generate(prompt: str, seed: int):
        return engine.run(GenerationRequest(prompt, width=64, height=64, seed=seed)).images[0]

    methods = {model: upscale, "lanczos": resize_method(Image.Resampling.LANCZOS),
               "bicubic": resize_method(Image.Resampling.BICUBIC)}
    bar = tqdm(total=args.n, desc="sr", unit="img", file=sys.stderr)
    try:
        report = evaluate_sr(methods, n=args.n, seed=args.seed,
                             generate=generate if args.generated else None,
                             progress=lambda done, total: bar.update(done - bar.n))
    finally:
        bar.close()
    data = {"model": engine.model_info(model).id, "n": args.n, "seed": args.seed,
            "bases": "generated by toile-mini" if args.generated else "renders",
            **report.to_dict()}
    if args.json:
        print(json.dumps(data))
        return 0
    print(f"{data['bases']}, {args.n} scenes, 64² -> 256²; base checker "
          f"{data['base_64_checker']}, true render sharpness {data['true_render_sharpness']}")
    print(f"  {'method':<14} {'checker':>8} {'psnr':>7} {'edge px':>8} {'sharpness':>10}")
    for name, row in data["methods"].items():
        cells = [row["checker"], row["psnr"], row["edge_width_px"], row["sharpness"]]
        print(f"  {name:<14} " + " ".join(f"{'-' if c is None else c:>8}" for c in cells))
    return 0
