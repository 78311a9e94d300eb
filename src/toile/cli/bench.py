"""``toile bench``: load time and seconds per image, with the family called directly as the
baseline in the same run, so engine overhead is reported as a ratio, not assumed.

Load is reported twice: the first load in this process (``cold_load_s``: it also imports torch,
diffusers and transformers, which is what a one-shot ``toile generate`` pays) and a second load
by a fresh engine with the libraries already imported (``load_s``: what a running server pays to
load a model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="measure load time and seconds per image")
    p.add_argument("--model", help="model id or path (default: built-in)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per side (default 5)")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--device", choices=("cpu", "cuda", "mps"))
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def summarize(samples: list[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "stdev_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    from toile.engine.engine import Engine
    from toile.errors import RequestError
    from toile.progress import RunContext
    from toile.request import GenerationRequest
    from toile.resolve import resolve

    if args.runs < 1:
        raise RequestError("runs", f"must be at least 1, got {args.runs}")
    start = time.perf_counter()
    Engine(device=args.device, dtype=args.dtype).load(args.model)
    cold_load_s = time.perf_counter() - start
    engine = Engine(device=args.device, dtype=args.dtype)  # its own, empty model cache
    start = time.perf_counter()
    cached = engine.load(args.model)
    load_s = time.perf_counter() - start
    fields = {k: getattr(args, k) for k in ("steps", "width", "height") if getattr(args, k)}
    request = GenerationRequest(args.prompt, model=args.model, seed=0, **fields)
    engine.run(request)  # warm-up: first-call allocations and kernel selection

    engine_s, direct_s = [], []
    for index in range(args.runs):
        # Interleave the two sides so drift (thermal, other load) hits both alike.
        req = request.with_changes(seed=index)
        t0 = time.perf_counter()
        engine.run(req)
        engine_s.append(time.perf_counter() - t0)
        resolved = resolve(req, cached.loaded.defaults, cached.family.name)
        t0 = time.perf_counter()
        cached.family.run(cached.loaded, resolved, RunContext())
        direct_s.append(time.perf_counter() - t0)
    result = {
        "model": cached.entry.id,
        "family": cached.family.name,
        "device": engine.device,
        "cold_load_s": cold_load_s,
        "load_s": load_s,
        "runs": args.runs,
        "engine": summarize(engine_s),
        "direct_family_call": summarize(direct_s),
        "engine_overhead_ratio": statistics.median(engine_s) / statistics.median(direct_s),
        "settings": {
            "steps": resolved.steps,
            "width": resolved.width,
            "height": resolved.height,
            "guidance": resolved.guidance,
        },
    }
    if args.json:
        print(json.dumps(result))
        return 0
    e, d = result["engine"], result["direct_family_call"]
    print(
        f"model {result['model']} ({result['family']}) on {result['device']}, "
        f"{resolved.width}x{resolved.height}, {resolved.steps} steps"
    )
    print(f"  load            {load_s:.3f} s  (first in this process, with imports: "
          f"{cold_load_s:.3f} s)")
    print(
        f"  per image       median {e['median_s']:.3f} s  (min {e['min_s']:.3f}, "
        f"max {e['max_s']:.3f}, n={args.runs})"
    )
    print(f"  direct family   median {d['median_s']:.3f} s")
    print(f"  engine/direct   {result['engine_overhead_ratio']:.3f}x")
    return 0
