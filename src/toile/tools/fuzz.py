"""Hostile input, measured: seeded, bounded fuzzing of every loader a user's file reaches.

    python -m toile.tools.fuzz --seed 1 --safetensors 10000 --images 10000 [--models 1000]
                               [--budget-s 600] [--json]

Mutated ``.safetensors`` files (headers: dtypes, offsets, shapes, metadata, length fields,
non-object JSON, deep nesting; truncations; data bytes) go through every loader a LoRA or a
single-file checkpoint reaches: ``toile loras`` (read the ``toile.*`` metadata), ``toile loras
add``, ``toile generate --model FILE`` (family detection), ``toile generate --lora FILE`` on the
built-in model (toile's U-Net) and on a Stable Diffusion pipeline (diffusers' LoRA loader,
peft and kohya layouts). Mutated images (PNG, APNG, JPEG, WebP, GIF, TIFF, BMP: bit flips,
truncations, huge declared sizes, zlib bombs, thousands of chunks, scans or frames, broken
``toile`` record chunks) go through the CLI's ``open_image``/``load_rgb``/``load_mask``,
``toile info`` (with and without ``--a1111``), and the server's upload decoders (base64 for the
native and A1111 APIs, multipart for the OpenAI one). Mutated model folders (a tiny toile model
in the built-in model's layout, one or two of its JSON configs, tokenizer or weight files
broken or deleted) go through family detection (``toile models add``, ``toile samplers``) and
the engine's load (``toile generate --model DIR``).

Everything runs in this process (no subprocess per case). The oracle: a loader either works or
raises a :class:`toile.errors.ToileError` whose message is one line — what the CLI prints as
``toile CMD: error: ...`` with exit status 2. Any other exception is a *finding* (it would be a
traceback), and so is a case that takes longer than ``--hang-s`` (10 s), a multi-line or
over-long message, or a LoRA left applied to the model after a failed load. The per-case timer
is SIGALRM: it interrupts Python code (a network retry loop, a loop building layers); a C call
that never returns would still be counted by the clock once it does. Every case is rebuilt from
``(seed, kind, index)``: ``--only-index N`` replays one and ``--traceback`` shows where a
finding came from; ``--keep DIR`` saves the inputs of findings.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toile.errors import ToileError
from toile.tools import fuzz_inputs as inputs

HANG_S = 10.0
UNMUTATED = 0.03  # share of cases that feed a seed file as it is (the loaders must accept it)
SERVER_MAX_BYTES = 16 * 1024 * 1024  # toile.serve.config defaults
SERVER_MAX_PIXELS = 4096 * 4096
MAX_MESSAGE = 2000  # characters: a longer error message is a finding too (a wall of text)


class Hang(BaseException):
    """Raised by the per-case timer; a BaseException so that no loader swallows it."""


@dataclass
class Counts:
    cases: int = 0
    ok: int = 0
    clean: int = 0  # one-line ToileErrors
    findings: int = 0
    slowest_s: float = 0.0
    slowest_case: str = ""  # "INDEX (mutation)": replay it with --only-index
    total_s: float = 0.0


@dataclass
class Finding:
    target: str
    kind: str
    index: int
    mutation: str
    error: str  # exception type, or "hang" / "multi-line message" / "state leak"
    message: str
    where: str  # innermost frame, and innermost toile frame when different
    seconds: float
    traceback: str = ""


@dataclass
class Report:
    seed: int
    hang_s: float
    counts: dict[str, Counts] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    elapsed_s: float = 0.0
    stopped_early: bool = False
    kinds: dict[str, int] = field(default_factory=dict)  # inputs made, per kind

    def to_dict(self) -> dict[str, Any]:
        findings = [asdict(f) for f in self.findings]
        for f in findings:
            f.pop("traceback")
        return {
            "seed": self.seed,
            "hang_s": self.hang_s,
            "elapsed_s": round(self.elapsed_s, 1),
            "stopped_early": self.stopped_early,
            "inputs": self.kinds,
            "targets": {name: asdict(c) | {"slowest_s": round(c.slowest_s, 3),
                                           "total_s": round(c.total_s, 1)}
                        for name, c in self.counts.items()},
            "totals": self.totals(),
            "findings": findings,
        }

    def totals(self) -> dict[str, int]:
        return {key: sum(getattr(c, key) for c in self.counts.values())
                for key in ("cases", "ok", "clean", "findings")}

    def table(self) -> str:
        lines = [f"{'target':<22} {'cases':>7} {'ok':>7} {'clean':>7} {'findings':>8} "
                 f"{'slowest':>8} {'total':>7}"]
        for name, c in self.counts.items():
            lines.append(f"{name:<22} {c.cases:>7} {c.ok:>7} {c.clean:>7} {c.findings:>8} "
                         f"{c.slowest_s:>7.2f}s {c.total_s:>6.0f}s")
        t = self.totals()
        lines.append(f"{'total':<22} {t['cases']:>7} {t['ok']:>7} {t['clean']:>7} "
                     f"{t['findings']:>8}")
        made = ", ".join(f"{n} {k}" for k, n in self.kinds.items())
        lines.append(f"inputs: {made}; seed {self.seed}; {self.elapsed_s:.0f} s"
                     + ("; stopped early (budget)" if self.stopped_early else ""))
        groups: dict[tuple[str, str, str], list[Finding]] = {}
        for f in self.findings:
            groups.setdefault((f.target, f.error, f.where), []).append(f)
        for (target, error, where), items in groups.items():
            first = items[0]
            lines.append(f"FINDING x{len(items)} {target}: {error}: {first.message[:200]} "
                         f"[{where}] first: --kind {first.kind} --only-index {first.index} "
                         f"({first.mutation})")
        return "\n".join(lines)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    text = f"{Path(last.filename).name}:{last.lineno} {last.name}"
    ours = [f for f in frames if "/toile/" in f.filename and "/tools/" not in f.filename]
    if ours and ours[-1] is not last:
        text += f" via {Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}"
    return text


@contextlib.contextmanager
def _timer(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after ``seconds`` (between Python bytecodes: a C call
    that never returns is still measured by the caller's clock)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Fuzzer:
    def __init__(self, seed: int, *, hang_s: float = HANG_S, budget_s: float | None = None,
                 keep: Path | None = None, show_traceback: bool = False,
                 show_errors: bool = False) -> None:
        self.report = Report(seed=seed, hang_s=hang_s)
        self.hang_s = hang_s
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.deadline: float | None = None
        self.keep = keep
        self.show_traceback = show_traceback
        self.show_errors = show_errors

    def start_budget(self) -> None:
        """The budget counts from here: after the models and seed files are built."""
        if self.budget_s:
            self.deadline = time.monotonic() + self.budget_s

    def out_of_time(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.report.stopped_early = True
            return True
        return False

    def run(self, target: str, kind: str, index: int, mutation: str, data: bytes,
            fn: Callable[[], Any], after: Callable[[], str | None] | None = None) -> None:
        counts = self.report.counts.setdefault(target, Counts())
        counts.cases += 1
        began = time.perf_counter()
        problem: tuple[str, str, str, str] | None = None  # error, message, where, traceback
        try:
            with _timer(self.hang_s):
                fn()
            outcome = "ok"
        except ToileError as exc:
            outcome = "clean"
            text = str(exc)
            if self.show_errors:
                print(f"{target} {kind}#{index}: {type(exc).__name__}: {text}", file=sys.stderr)
            if "\n" in text or len(text) > MAX_MESSAGE:
                what = "multi-line message" if "\n" in text else "message too long"
                problem = (what, f"{type(exc).__name__}: {text[:300]!r}", _where(exc), "")
        except Hang as exc:
            problem = ("hang", str(exc), _where(exc), traceback.format_exc())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # anything else is the finding
            first_line = (str(exc).splitlines() or [""])[0]
            problem = (type(exc).__name__, first_line[:500], _where(exc), traceback.format_exc())
        seconds = time.perf_counter() - began
        if seconds > counts.slowest_s:
            counts.slowest_s, counts.slowest_case = seconds, f"{index} ({mutation})"
        counts.total_s += seconds
        if problem is None and seconds > self.hang_s:
            problem = ("hang", f"took {seconds:.1f} s", "?", "")
        if problem is None and after is not None:
            leak = after()
            if leak:
                problem = ("state leak", leak, "?", "")
        if problem is None:
            if outcome == "ok":
                counts.ok += 1
            else:
                counts.clean += 1
            return
        counts.findings += 1
        finding = Finding(target, kind, index, mutation, problem[0], problem[1], problem[2],
                          round(seconds, 3), problem[3])
        self.report.findings.append(finding)
        if self.show_traceback:
            print(f"--- {target} {kind}#{index} ({mutation}): {problem[0]}: {problem[1]}\n"
                  f"{problem[3]}", file=sys.stderr)
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            (self.keep / f"{kind}-{index}-{target}.bin").write_bytes(data)


# ---------------------------------------------------------------------------------------------
# safetensors targets


class SafetensorsTargets:
    """The models LoRAs are applied to, built once; the seed files to mutate."""

    def __init__(self, workdir: Path) -> None:
        import torch
        from diffusers import UNet2DConditionModel

        from toile.config import builtin_models_dir
        from toile.train.finetune.lora import add_lora, save_lora

        self.workdir = workdir
        unet_dir = builtin_models_dir() / "toile-mini" / "unet"
        self.toile_unet = UNet2DConditionModel.from_pretrained(str(unet_dir)).eval()
        source = UNet2DConditionModel.from_pretrained(str(unet_dir))
        torch.manual_seed(0)
        add_lora(source, rank=2, alpha=2, targets=("to_q", "to_v"))  # fewer layers: faster
        toile_lora = save_lora(workdir / "seed-toile.safetensors", {"unet": source},
                               {"family": "toile", "base_model": "toile-mini", "rank": 2,
                                "steps": 1, "prompt": "a star"})
        self.sd_pipe, sd_peft, sd_kohya = _tiny_sd(workdir)
        self.seeds = [("toile-lora", toile_lora.read_bytes()),
                      ("sd-peft-lora", sd_peft), ("sd-kohya-lora", sd_kohya)]
        self.registry_path = workdir / "loras.json"

    def targets(self, path: Path) -> list[tuple[str, Callable[[], Any], Callable | None]]:
        return [
            ("st:loras-info", lambda: _lora_info(path), None),
            ("st:loras-add", lambda: _loras_add(self.registry_path, path), None),
            ("st:detect-model", lambda: _detect(path), None),
            ("st:toile-lora", lambda: _toile_lora(self.toile_unet, path), self._toile_leak),
            ("st:sd-lora", lambda: _sd_lora(self.sd_pipe, path), self._sd_leak),
        ]

    def _toile_leak(self) -> str | None:
        if getattr(self.toile_unet, "peft_config", None):
            self.toile_unet.unload_lora()
            return "toile's U-Net kept LoRA layers after the run"
        return None

    def _sd_leak(self) -> str | None:
        adapters = self.sd_pipe.get_list_adapters()
        if any(adapters.values()):
            self.sd_pipe.unload_lora_weights()
            return f"the pipeline kept LoRA adapters after the run: {adapters}"
        return None

    def case(self, rng: random.Random) -> tuple[bytes, str]:
        if rng.random() < 0.15:
            name, data = "random-tensors", inputs.random_tensor_file(rng)
        else:
            name, data = rng.choice(self.seeds)
        if rng.random() < UNMUTATED:
            return data, f"{name}(as is)"
        data, applied = inputs.mutate(rng, data, inputs.ST_MUTATORS)
        return data, f"{name}:{applied}"


def _tiny_sd(workdir: Path) -> tuple[Any, bytes, bytes]:
    """A tiny Stable Diffusion pipeline (random weights, no tokenizer: LoRA loading needs
    none) and two LoRA files for it: peft/diffusers keys, and kohya keys."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as UNet
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    # As few layers as an SD U-Net can have: peft's cost per load grows with the module count.
    unet = UNet(block_out_channels=(8,), layers_per_block=1, sample_size=8, in_channels=4,
                out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
                cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
        vocab_size=1000, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                        norm_num_groups=4, sample_size=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    text.add_adapter(LoraConfig(r=2, lora_alpha=2,
                                target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    unet_state = get_peft_model_state_dict(unet)
    text_state = get_peft_model_state_dict(text)
    out = workdir / "seed-sd"
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
        safe_serialization=True)
    peft_bytes = (out / "pytorch_lora_weights.safetensors").read_bytes()
    unet.delete_adapters("default")
    text.delete_adapter("default")
    kohya: dict[str, torch.Tensor] = {}
    for prefix, state in (("lora_unet_", unet_state), ("lora_te_", text_state)):
        for key, value in state.items():
            module, _, rest = key.rpartition(".lora_")
            if prefix == "lora_te_" and not module.startswith("text_model."):
                module = "text_model." + module  # kohya names CLIP's layers from its root
            name = prefix + module.replace(".", "_")
            kohya[f"{name}.lora_{'down' if rest.startswith('A') else 'up'}.weight"] = (
                value.contiguous())
            kohya[f"{name}.alpha"] = torch.tensor(2.0)
    return pipe, peft_bytes, save(kohya, metadata={"ss_network_dim": "2"})


def _lora_info(path: Path) -> None:
    from toile.cli.loras_cmd import describe
    from toile.engine.models import LoraEntry
    from toile.io.lora_info import read_lora_info

    read_lora_info(path)
    row = describe(LoraEntry("fuzz", path))  # `toile loras`: errors become the row's text
    json.dumps(row)


def _loras_add(registry: Path, path: Path) -> None:
    from toile.engine.models import LoraRegistry

    LoraRegistry(registry).add("fuzz", path)


def _detect(path: Path) -> None:
    from toile.families.registry import detect_family

    family = detect_family(path)
    family.variant(path)


def _toile_lora(unet: Any, path: Path) -> None:
    from toile.families.toile.lora import loras_applied
    from toile.request import LoraSpec

    with loras_applied(unet, (LoraSpec(str(path), 0.8),)):
        pass


def _sd_lora(pipe: Any, path: Path) -> None:
    from toile.families.diffusers_common import loras_applied
    from toile.request import LoraSpec

    with loras_applied(pipe, (LoraSpec(str(path), 0.8),)):
        pass


# ---------------------------------------------------------------------------------------------
# model folder targets


class ModelTargets:
    """A tiny toile model folder (the built-in model's layout, with its text encoder inside),
    mutated one or two files at a time; unchanged files are symlinks to the seed folder."""

    JSON_FILES = ("model_index.json", "toile_config.json", "unet/config.json",
                  "scheduler/scheduler_config.json", "text/config.json", "text/tokenizer.json",
                  "text/tokenizer_config.json")

    def __init__(self, workdir: Path) -> None:
        from dataclasses import replace

        from toile.engine.engine import Engine
        from toile.families.toile.config import TextEncoderConfig
        from toile.families.toile.pipeline import ToilePipeline
        from toile.families.toile.testing import (
            TINY_TEXT_DIM,
            tiny_model_config,
            tiny_text_encoder,
        )

        self.seed = workdir / "seed-model"
        tiny_text_encoder(self.seed / "text")
        config = replace(tiny_model_config(self.seed / "text"),
                         text=TextEncoderConfig(path="text", max_tokens=12, dim=TINY_TEXT_DIM))
        ToilePipeline.from_config(config, seed=0, model_folder=self.seed).save_pretrained(
            self.seed)
        self.files = sorted(p.relative_to(self.seed).as_posix()
                            for p in self.seed.rglob("*") if p.is_file())
        self.workdir = workdir
        self.engine = Engine(device="cpu", policy=None)

    def case(self, rng: random.Random) -> tuple[dict[str, bytes | None], str]:
        """{relative path: new bytes, or None to delete it}, and what was done."""
        changes: dict[str, bytes | None] = {}
        done = []
        if rng.random() < UNMUTATED:
            return changes, "toile-model(as is)"
        for _ in range(rng.choice((1, 1, 2))):
            roll = rng.random()
            if roll < 0.55:
                name = rng.choice(self.JSON_FILES)
                data = (self.seed / name).read_bytes()
                try:
                    value = json.loads(data)
                    text = inputs.dump_json(inputs.mutate_json_value(rng, value), rng)
                    changes[name] = text.encode("utf-8", "surrogatepass")
                    done.append(f"json:{name}")
                except (ValueError, RecursionError):
                    changes[name], what = inputs.mutate(rng, data, inputs.IMAGE_MUTATORS[2:])
                    done.append(f"{what}:{name}")
            elif roll < 0.8:
                name = rng.choice(("unet/diffusion_pytorch_model.safetensors",
                                   "text/model.safetensors"))
                changes[name], what = inputs.mutate(rng, (self.seed / name).read_bytes(),
                                                    inputs.ST_MUTATORS)
                done.append(f"{what}:{name}")
            elif roll < 0.9:
                name = rng.choice(self.files)
                changes[name] = None
                done.append(f"delete:{name}")
            else:
                name = rng.choice(self.JSON_FILES)
                data = (self.seed / name).read_bytes()
                changes[name], what = inputs.mutate(rng, data, inputs.IMAGE_MUTATORS[2:])
                done.append(f"{what}:{name}")
        return changes, "+".join(done)

    def build(self, folder: Path, changes: dict[str, bytes | None]) -> bytes:
        """Lay out the case's folder; returns a description of the changes (for --keep)."""
        for name in self.files:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name not in changes:
                target.symlink_to(self.seed / name)
            elif changes[name] is not None:
                target.write_bytes(changes[name])
        return json.dumps({k: None if v is None else v[:2000].decode("latin-1")
                           for k, v in changes.items()}).encode()

    def targets(self, folder: Path) -> list[tuple[str, Callable[[], Any], None]]:
        return [
            ("model:detect", lambda: _detect_folder(folder), None),
            ("model:load", lambda: self.engine.load(str(folder)), None),
        ]


def _detect_folder(folder: Path) -> None:
    """`toile models add DIR` and `toile samplers --model DIR`: detection and configs only."""
    from toile.families.registry import checkpoint_samplers, detect_family

    family = detect_family(folder)
    family.variant(folder)
    checkpoint_samplers(folder)


# ---------------------------------------------------------------------------------------------
# image targets


class ImageTargets:
    def __init__(self, workdir: Path) -> None:
        from toile.io.metadata import a1111_parameters
        from toile.result import ImageRecord

        record = ImageRecord(
            model_id="toile-mini", family="toile", model_hash="ab" * 32, mode="txt2img",
            prompt="a red star", negative_prompt="blur", width=64, height=64, steps=8,
            guidance=3.0, seed=7, loras=({"name": "star", "hash": "cd" * 32, "scale": 0.8},),
            prompt_weights=(("a red star", 1.0),), sampler="Euler",
            software={"toile": "0.1.0"}, timings={"total": 1.5},
        )
        self.seeds = inputs.image_seeds(record.to_json(), a1111_parameters(record))

    def case(self, rng: random.Random) -> tuple[bytes, str]:
        name, data = rng.choice(self.seeds)
        if rng.random() < UNMUTATED:
            return data, f"{name}(as is)"
        data, applied = inputs.mutate(rng, data, inputs.IMAGE_MUTATORS)
        return data, f"{name}:{applied}"

    @staticmethod
    def targets(path: Path, data: bytes) -> list[tuple[str, Callable[[], Any], None]]:
        text = base64.b64encode(data).decode()
        return [
            ("img:cli-load-rgb", lambda: _check_mode(_load("rgb", str(path)), "RGB"), None),
            ("img:cli-load-mask", lambda: _check_mode(_load("mask", str(path)), "L"), None),
            ("img:info", lambda: _info(path, a1111=False), None),
            ("img:info-a1111", lambda: _info(path, a1111=True), None),
            ("img:upload-image", lambda: _upload(text, "image"), None),
            ("img:upload-mask", lambda: _upload(text, "mask"), None),
            ("img:openai-multipart", lambda: _openai(data), None),
        ]


def _load(which: str, path: str) -> Any:
    from toile.io.images import load_mask, load_rgb

    return load_rgb(path) if which == "rgb" else load_mask(path)


def _check_mode(image: Any, mode: str) -> None:
    if image.mode != mode:
        raise AssertionError(f"expected a {mode} image, got {image.mode}")


def _info(path: Path, *, a1111: bool) -> None:
    from toile.cli.info import run

    with contextlib.redirect_stdout(io.StringIO()):
        run(argparse.Namespace(image=str(path), a1111=a1111))


def _upload(text: str, field: str) -> None:
    from toile.serve.uploads import read_upload

    upload = read_upload(text, field=field, max_bytes=SERVER_MAX_BYTES,
                         max_pixels=SERVER_MAX_PIXELS)
    _check_mode(upload.image, "L" if field == "mask" else "RGB")


def _openai(data: bytes) -> None:
    from toile.serve.routes.openai import _decode

    _decode(data, "image", SERVER_MAX_PIXELS)


# ---------------------------------------------------------------------------------------------


def fuzz(seed: int, *, safetensors: int, images: int, models: int = 0,
         budget_s: float | None = None,
         hang_s: float = HANG_S, keep: Path | None = None, only_index: int | None = None,
         only_kind: str | None = None, show_traceback: bool = False, show_errors: bool = False,
         progress: Callable[[str], None] | None = None) -> Report:
    """Run the fuzzer in this process and return its report (see the module docstring)."""
    from toile.logs import quiet_libraries

    fuzzer = Fuzzer(seed, hang_s=hang_s, budget_s=budget_s, keep=keep,
                    show_traceback=show_traceback, show_errors=show_errors)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="toile-fuzz-") as tmp, _quiet(), \
            _env("TOILE_HOME", str(Path(tmp) / "home")):
        workdir = Path(tmp)
        plan = {"safetensors": safetensors, "images": images, "models": models}
        plan = {kind: total for kind, total in plan.items()
                if total > 0 and only_kind in (None, kind)}
        makers: dict[str, Any] = {
            kind: {"safetensors": SafetensorsTargets, "images": ImageTargets,
                   "models": ModelTargets}[kind](workdir) for kind in plan}
        queues = {kind: iter(range(total) if only_index is None else [only_index])
                  for kind, total in plan.items()}
        made = dict.fromkeys(plan, 0)
        fuzzer.start_budget()
        # The kinds take turns, each kept at the same share of its total, so that a budget
        # that runs out still leaves every kind measured.
        while queues and not fuzzer.out_of_time():
            kind = min(queues, key=lambda k: made[k] / plan[k])
            index = next(queues[kind], None)
            if index is None:
                del queues[kind]
                continue
            maker = makers[kind]
            rng = random.Random(f"{seed}/{kind}/{index}")
            data, mutation = maker.case(rng)
            made[kind] += 1
            if kind == "safetensors":
                path = workdir / f"case-{index}.safetensors"
                path.write_bytes(data)
                cases = maker.targets(path)
            elif kind == "images":
                path = workdir / f"case-{index}{_suffix(data)}"
                path.write_bytes(data)
                cases = maker.targets(path, data)
            else:
                path = workdir / f"model-{index}"
                data = maker.build(path, data)
                cases = maker.targets(path)
            for target, fn, after in cases:
                fuzzer.run(target, kind, index, mutation, data, fn, after)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            if progress is not None and made[kind] % 1000 == 0:
                progress(f"{kind}: {made[kind]}/{plan[kind]}, "
                         f"{len(fuzzer.report.findings)} findings, "
                         f"{time.monotonic() - fuzzer.start:.0f} s")
        fuzzer.report.kinds = made
    fuzzer.report.elapsed_s = time.monotonic() - fuzzer.start
    return fuzzer.report


def _suffix(data: bytes) -> str:
    for magic, suffix in ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF", ".gif"),
                          (b"II*\0", ".tif"), (b"MM\0*", ".tif"), (b"RIFF", ".webp"),
                          (b"BM", ".bmp")):
        if data.startswith(magic):
            return suffix
    return ".img"


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No library warnings (decompression-bomb, peft, diffusers) over the report."""
    import logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toile.tools.fuzz",
        description="Seeded, bounded fuzzing of toile's file loaders; exit 1 on any finding.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--safetensors", type=int, default=1000, metavar="K",
                        help="mutated .safetensors files (each through every loader)")
    parser.add_argument("--images", type=int, default=1000, metavar="K",
                        help="mutated images (each through every loader)")
    parser.add_argument("--models", type=int, default=0, metavar="K",
                        help="mutated toile model folders (each detected and loaded)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this many seconds (counted once "
                             "the seed models and files are built)")
    parser.add_argument("--hang-s", type=float, default=HANG_S,
                        help="a case slower than this is a finding (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="save the input of every finding in DIR")
    parser.add_argument("--kind", choices=("safetensors", "images", "models"), default=None,
                        help="run only this kind of input")
    parser.add_argument("--only-index", type=int, default=None, metavar="N",
                        help="replay case N only (with --kind)")
    parser.add_argument("--traceback", action="store_true",
                        help="print each finding's traceback to stderr")
    parser.add_argument("--show-errors", action="store_true",
                        help="print every clean error message to stderr (to read them)")
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)  # tiny models: threads only wait on each other
    except ImportError:
        pass

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = fuzz(args.seed, safetensors=args.safetensors, images=args.images,
                  models=args.models, budget_s=args.budget_s, hang_s=args.hang_s, keep=args.keep,
                  only_index=args.only_index, only_kind=args.kind,
                  show_traceback=args.traceback, show_errors=args.show_errors,
                  progress=None if args.json else progress)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
