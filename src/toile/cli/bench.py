"""``toile bench``: load time and seconds per image, with the family called directly as the
baseline in the same run, so engine overhead is reported as a ratio, not assumed; with
``--vs MODEL`` a second model (or the same with other settings) runs interleaved with the first
and the report gives the ratio of their medians.

The direct baseline replays the request's plan stage by stage (a cascade: the base at its size,
then each SR pass), calling each family without the engine around it.

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
from dataclasses import replace
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="measure load time and seconds per image")
    p.add_argument("--model", help="model id or path (default: built-in)")
    p.add_argument("--vs", metavar="MODEL",
                   help="a second model run interleaved with the first, same settings")
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
    from toile.request import GenerationRequest

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

    other = None
    if args.vs:
        other = engine.load(args.vs)
        engine.run(request.with_changes(model=args.vs))  # its warm-up
    engine_s, direct_s, vs_s = [], [], []
    for index in range(args.runs):
        # Interleave the sides so drift (thermal, other load) hits them alike.
        req = request.with_changes(seed=index)
        t0 = time.perf_counter()
        engine.run(req)
        engine_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        resolved = direct_run(engine, cached, req)
        direct_s.append(time.perf_counter() - t0)
        if other is not None:
            t0 = time.perf_counter()
            engine.run(req.with_changes(model=args.vs))
            vs_s.append(time.perf_counter() - t0)
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
        "peak_rss_mb": peak_rss_mb(),
        "settings": {
            "steps": resolved.steps,
            "width": resolved.width,
            "height": resolved.height,
            "guidance": resolved.guidance,
        },
    }
    if other is not None:
        result["vs"] = {"model": other.entry.id, **summarize(vs_s),
                        "ratio_of_medians": statistics.median(vs_s) / statistics.median(engine_s),
                        "ratio_range": [min(vs_s) / max(engine_s), max(vs_s) / min(engine_s)]}
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
    if other is not None:
        v = result["vs"]
        low, high = v["ratio_range"]
        print(f"  vs {v['model']:<12} median {v['median_s']:.3f} s  (min {v['min_s']:.3f}, "
              f"max {v['max_s']:.3f}); {v['ratio_of_medians']:.3f}x the first "
              f"(range {low:.3f}-{high:.3f})")
    print(f"  peak memory     {result['peak_rss_mb']:.0f} MB (the process's resident high-water "
          "mark)")
    return 0


def direct_run(engine: Any, cached: Any, request: Any) -> Any:
    """``request``'s plan with each stage's family called directly (no engine around it);
    returns the base's resolved request (for the settings line)."""
    from PIL import Image

    from toile.engine.plan import plan_for
    from toile.progress import RunContext
    from toile.resolve import resolve

    resolved = resolve(request, cached.loaded.defaults, cached.family.name)
    plan = plan_for(resolved, cached.loaded.defaults)
    first = resolved
    if plan.base_size is not None:
        first = replace(resolved, width=plan.base_size[0], height=plan.base_size[1])
    images = cached.family.run(cached.loaded, first, RunContext())
    for stage in plan.stages[1:]:
        assert stage.follow is not None
        model = engine.load(stage.model)
        images = [model.family.run(model.loaded, resolve(
            stage.follow(image, seed), model.loaded.defaults, model.family.name), RunContext())[0]
            for image, seed in zip(images, resolved.seeds, strict=True)]
    size = (resolved.width, resolved.height)
    images = [image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
              for image in images]  # the engine's last step of an upscale or cascade plan
    return resolved


def peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
