"""Seamless tiling (A1111's "Tiling"): circular padding for one run, what makes it tile (the
denoiser and VAE commute with circular shifts), the request, record, CLI and A1111 fields,
and the families and tasks that refuse it."""

from __future__ import annotations

import json

import pytest
import torch

from toile.engine.engine import Engine
from toile.errors import RequestError
from toile.families.tiling import circular_padding
from toile.request import GenerationRequest, Mode
from toile.resolve import ResolvedRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd_path(tiny_models):
    return tiny_models("sd")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu")


def padding_modes(*modules: torch.nn.Module) -> set[str]:
    return {layer.padding_mode for module in modules for layer in module.modules()
            if isinstance(layer, torch.nn.Conv2d) and any(layer._reversed_padding_repeated_twice)}


def roll_error(model, x: torch.Tensor, shift: tuple[int, int], scale: int = 1) -> float:
    """How far ``model`` is from commuting with a circular shift of its input by ``shift``
    (its output, ``scale`` times larger, shifted by ``scale`` x ``shift``)."""
    dims = (-2, -1)
    with torch.no_grad():
        rolled_in = model(torch.roll(x, shift, dims))
        rolled_out = torch.roll(model(x), tuple(s * scale for s in shift), dims)
    return (rolled_in - rolled_out).abs().max().item()


def test_circular_padding_sets_restores_and_finds_lora_convs():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.Conv2d(4, 4, 1),  # no padding: nothing to wrap, left alone
        torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    )
    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), net)
    base = net[0].base_layer  # peft wraps the conv; the wrapper itself is no Conv2d
    assert not isinstance(net[0], torch.nn.Conv2d)
    with circular_padding(net, net):  # a module given twice counts once
        assert base.padding_mode == "circular" and net[2].padding_mode == "circular"
        assert padding_modes(net) == {"circular"}  # the LoRA's own 3x3 down-projection too
        assert net[1].padding_mode == "zeros"
        net(torch.zeros(1, 3, 8, 8))
    assert (base.padding_mode, net[1].padding_mode, net[2].padding_mode) == (
        "zeros", "zeros", "reflect")
    with pytest.raises(RuntimeError), circular_padding(net):
        raise RuntimeError("a failed run")
    assert (base.padding_mode, net[2].padding_mode) == ("zeros", "reflect")


def test_unet_and_vae_commute_with_circular_shifts_only_when_tiled(sd_path):
    """Why it tiles: with circular padding the U-Net's prediction for a shifted latent is the
    shifted prediction, and the VAE decodes a shifted latent to the shifted image — no edge
    exists. With zero padding the edges differ."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_path / "unet").eval()
    vae = AutoencoderKL.from_pretrained(sd_path / "vae").eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 5, unet.config.cross_attention_dim, generator=generator)

    def denoise(x: torch.Tensor) -> torch.Tensor:
        return unet(x, 10, encoder_hidden_states=text).sample

    def decode(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(x).sample

    # shifts by whole multiples of the 2x downsampling, as a tile boundary can fall anywhere
    shift, scale = (4, 6), 2 ** (len(vae.config.block_out_channels) - 1)
    plain = (roll_error(denoise, latents, shift), roll_error(decode, latents, shift, scale))
    with circular_padding(unet, vae):
        tiled = (roll_error(denoise, latents, shift), roll_error(decode, latents, shift, scale))
    assert max(tiled) < 1e-4, tiled
    assert min(plain) > 100 * max(tiled) + 1e-3, plain
    assert padding_modes(unet, vae) == {"zeros"}


def test_toile_unet_commutes_with_circular_shifts_when_tiled(tmp_path_factory, text_folder):
    from finetune_common import make_tiny_toile
    from toile.families.toile.denoiser import TextCondition, predict_velocity
    from toile.families.toile.pipeline import ToilePipeline

    folder = make_tiny_toile(tmp_path_factory.mktemp("tiny-toile"), text_folder)
    unet = ToilePipeline.from_pretrained(folder).unet.eval()
    generator = torch.Generator().manual_seed(0)
    side = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, side, side, generator=generator)
    dim = unet.config.cross_attention_dim
    cond = TextCondition(torch.randn(1, 3, dim, generator=generator), torch.ones(1, 3),
                         torch.randn(1, dim, generator=generator))
    step = 2 ** (len(unet.config.block_out_channels) - 1)

    def velocity(sample: torch.Tensor) -> torch.Tensor:
        return predict_velocity(unet, sample, torch.tensor([0.5]), cond)

    plain = roll_error(velocity, x, (step, 2 * step))
    with circular_padding(unet):
        tiled = roll_error(velocity, x, (step, 2 * step))
    assert tiled < 1e-4 and plain > 100 * tiled + 1e-3, (tiled, plain)

    result = Engine(device="cpu").run(
        GenerationRequest("a red star", model=str(folder), steps=2, seed=1, tiling=True))
    assert result.records[0].tiling and result.records[0].family == "toile"


def test_engine_run_records_tiling_and_restores_the_modes(engine, sd_path):
    from toile.io.metadata import a1111_parameters

    request = GenerationRequest("a red cat", model=str(sd_path), steps=2, seed=3)
    plain = engine.run(request)
    tiled = engine.run(request.with_changes(tiling=True))
    pipe = engine.load(str(sd_path)).loaded.pipelines[Mode.TXT2IMG]
    assert padding_modes(pipe.unet, pipe.vae) == {"zeros"}
    assert tiled.images[0].tobytes() != plain.images[0].tobytes()
    assert tiled.records[0].tiling and not plain.records[0].tiling
    assert "Tiling: True" in a1111_parameters(tiled.records[0])
    assert "Tiling" not in a1111_parameters(plain.records[0])

    def fail(event) -> None:
        assert padding_modes(pipe.unet, pipe.vae) == {"circular"}  # on during the run
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        engine.run(request.with_changes(tiling=True), progress=fail)
    assert padding_modes(pipe.unet, pipe.vae) == {"zeros"}


def test_cli_flag(sd_path, tmp_path, capsys):
    from toile.cli.main import main

    out = tmp_path / "tile.png"
    assert main(["generate", "a brick wall", "--model", str(sd_path), "--steps", "1",
                 "--seed", "2", "--tiling", "-o", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["images"][0]["record"]["tiling"] is True
    assert main(["info", str(out), "--a1111"]) == 0
    assert "Tiling: True" in capsys.readouterr().out


def test_a1111_and_native_api_accept_tiling(sd_path, tmp_path):
    from serve_helpers import MODEL, tiny_engine, wait_job
    from serve_helpers import serve as serve_app

    served = tiny_engine(sd_path, tmp_path / "registry")
    with serve_app(served, tmp_path / "data") as client:
        answer = client.post("/sdapi/v1/txt2img", json={
            "prompt": "a brick wall", "tiling": True, "steps": 1, "width": 32, "height": 32,
            "seed": 4, "override_settings": {"sd_model_checkpoint": MODEL}})
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert info["toile_records"][0]["tiling"] is True
        assert "Tiling: True" in info["infotexts"][0]
        job = client.post("/v1/jobs", json={"prompt": "a brick wall", "model": MODEL,
                                            "steps": 1, "tiling": True}).json()
        done = wait_job(client, job["id"])
        assert done["status"] == "succeeded" and done["images"][0]["record"]["tiling"] is True


def test_other_tasks_and_bad_values_are_refused():
    from PIL import Image

    image = Image.new("RGB", (16, 16))
    with pytest.raises(RequestError) as info:
        GenerationRequest("", task="upscale", image=image, tiling=True)
    assert info.value.field == "tiling" and "generate task" in str(info.value)
    with pytest.raises(RequestError) as info:
        GenerationRequest("x", tiling="yes")
    assert info.value.field == "tiling"
    GenerationRequest("x", image=image, tiling=True)  # img2img is a generate mode


def test_each_image_family_decides_and_the_others_refuse():
    from toile.families.registry import FAMILY_CLASSES, get_family
    from toile.families.tiling import check_tiling
    from toile.request import GENERATE_MODES

    generating = {name for name in FAMILY_CLASSES if any(
        modes & GENERATE_MODES for modes in get_family(name).capabilities.values())}
    decided = {name: get_family(name).tiling for name in generating}  # every one says
    assert {name for name, ok in decided.items() if ok} == {"sd", "sdxl", "toile"}
    resolved = ResolvedRequest(request=GenerationRequest("x", tiling=True), mode=Mode.TXT2IMG,
                               width=32, height=32, steps=1, guidance=1.0, strength=None,
                               seeds=(0,))
    for name in generating - {"sd", "sdxl", "toile"}:
        with pytest.raises(RequestError) as info:  # the check the engine makes for every family
            check_tiling(get_family(name), resolved)
        assert info.value.field == "tiling" and name in str(info.value)
    for name in ("sd", "sdxl", "toile"):
        check_tiling(get_family(name), resolved)


def test_engine_refuses_tiling_on_a_family_that_cannot(tiny_models):
    with pytest.raises(RequestError) as info:
        Engine(policy=None).run(GenerationRequest("x", model=str(tiny_models("flux_schnell")),
                                                  steps=1, width=32, height=32, tiling=True))
    assert info.value.field == "tiling" and "flux" in str(info.value)
