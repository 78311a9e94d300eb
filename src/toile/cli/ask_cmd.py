"""``toile ask IMAGE QUESTION``: answer a question about an image (VQA)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from toile.cli.task_options import add_model_options, engine_for, print_policy_warnings


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ask",
        help="answer a question about an image",
        description="Answer QUESTION about IMAGE with a reader model (BLIP VQA, BLIP-2, a "
        "vision-language model); greedy decoding, so the same question gets the same answer.",
    )
    p.add_argument("image")
    p.add_argument("question")
    add_model_options(p, "answer")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toile.io.images import load_rgb
    from toile.request import GenerationRequest, Task

    request = GenerationRequest(prompt="", task=Task.ANSWER, question=args.question,
                                model=args.model, image=load_rgb(args.image, field="image"))
    result = engine_for(args).run(request)
    if args.json:
        print(json.dumps({"answer": result.texts[0], "record": result.records[0].to_dict()}))
    else:
        print(result.texts[0])
        print_policy_warnings(result, Task.ANSWER)
    return 0
