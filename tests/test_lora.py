"""LoRA files applied at generation time: several at once, with scales, then unloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import max_abs_diff
from toile.engine.engine import Engine
from toile.errors import RequestError
from toile.request import GenerationRequest, LoraSpec


def make_sd_lora(base: Path, out: Path, seed: int) -> Path:
    """A random LoRA on the tiny U-Net's attention, saved in diffusers' LoRA layout."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    with torch.no_grad():  # gaussian init leaves B at zero; make the LoRA do something
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    base = tiny_models("sd")
    return make_sd_lora(base, root / "a", 1), make_sd_lora(base, root / "b", 2)


def run(engine, model, loras=()):
    return engine.run(
        GenerationRequest("a cat", model=str(model), steps=2, seed=3, loras=tuple(loras))
    ).images[0]


def test_lora_changes_output_and_unloads(tiny_models, loras):
    engine = Engine(device="cpu")
    model = tiny_models("sd")
    plain = run(engine, model)
    with_a = run(engine, model, [LoraSpec(str(loras[0]), 1.0)])
    assert max_abs_diff(plain, with_a) > 10
    zero = run(engine, model, [LoraSpec(str(loras[0]), 0.0)])
    assert max_abs_diff(plain, zero) <= 2  # scale 0 is the base model
    both = run(engine, model, [LoraSpec(str(loras[0]), 1.0), LoraSpec(str(loras[1]), 0.5)])
    assert max_abs_diff(both, with_a) > 2
    assert max_abs_diff(run(engine, model), plain) <= 2  # unloaded after the run


def test_lora_record(tiny_models, loras):
    result = Engine(device="cpu").run(
        GenerationRequest(
            "a cat",
            model=str(tiny_models("sd")),
            steps=1,
            seed=0,
            loras=(LoraSpec(str(loras[0]), 0.7),),
        )
    )
    lora = result.records[0].loras[0]
    assert lora["name"] == "pytorch_lora_weights" and lora["scale"] == 0.7
    assert len(lora["hash"]) == 64


def test_bad_lora_files(tiny_models, tmp_path):
    engine = Engine(device="cpu")
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(RequestError, match="loras.path: .* must be an existing .safetensors"):
        engine.run(
            GenerationRequest(
                "a", model=str(tiny_models("sd")), steps=1, loras=(LoraSpec(str(missing)),)
            )
        )
    junk = tmp_path / "junk.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"nothing.here": torch.zeros(2)}, str(junk))
    with pytest.raises(RequestError, match="loras: cannot apply"):
        engine.run(
            GenerationRequest(
                "a", model=str(tiny_models("sd")), steps=1, loras=(LoraSpec(str(junk)),)
            )
        )
    # The engine still serves the next request.
    assert engine.run(GenerationRequest("a", model=str(tiny_models("sd")), steps=1)).images
