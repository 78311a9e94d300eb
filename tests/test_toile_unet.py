"""toile's plain-PyTorch U-Net (families/toile/unet.py) against diffusers' UNet2DConditionModel:
same keys, same outputs, same folders, and a clear refusal of what it does not implement."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from toile.families.toile.unet import (  # noqa: E402
    DIFFUSERS_DEFAULTS,
    ToileUNet,
    UnsupportedConfigError,
    load_unet,
    save_unet,
    unet_config,
)

SHIPPED_UNET = Path(__file__).resolve().parents[1] / "src/toile/assets/toile-mini/unet"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_kwargs(**changes) -> dict:
    """toile's kind of config (denoiser.unet_kwargs), small widths."""
    kwargs = {
        "sample_size": 16, "in_channels": 12, "out_channels": 12,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": (16, 32, 48), "layers_per_block": 1, "attention_head_dim": 8,
        "norm_num_groups": 8, "cross_attention_dim": 24, "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 24, "use_linear_projection": True,
    }
    return kwargs | changes


def random_pair(kwargs: dict, seed: int = 0):
    """A random diffusers U-Net (every tensor drawn, not just the init) and ours holding it."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**kwargs).eval()
    with torch.no_grad():
        for tensor in ref.state_dict().values():
            tensor.normal_(0.0, 0.2)
    ours = ToileUNet(kwargs).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())  # same keys, same order
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(kwargs: dict, batch: int = 3, side: int = 16, tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    dim = kwargs["cross_attention_dim"]
    x = torch.randn(batch, kwargs["in_channels"], side, side, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, tokens, dim, generator=g)
    mask = torch.ones(batch, tokens)
    mask[0, 3:] = 0  # padding in some rows, none in others
    mask[1, 5:] = 0
    pooled = torch.randn(batch, dim, generator=g)
    return x, t, {"encoder_hidden_states": context, "encoder_attention_mask": mask,
                  "class_labels": pooled}


def run(model, x, t, kw):
    with torch.no_grad():
        return model(x, t, **kw, return_dict=False)[0]


@pytest.mark.parametrize("changes", [
    {},  # toile-mini's layout
    {"layers_per_block": 2},
    {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
     "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
     "layers_per_block": (1, 2, 1), "attention_head_dim": (4, 8, 6)},
    {"block_out_channels": (16, 16), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
     "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": 2,
     "class_embed_type": None, "projection_class_embeddings_input_dim": None},
])
def test_outputs_match_diffusers(changes) -> None:
    kwargs = tiny_kwargs(**changes)
    ref, ours = random_pair(kwargs)
    x, t, kw = inputs(kwargs)
    want, got = run(ref, x, t, kw), run(ours, x, t, kw)
    assert got.shape == want.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # sides that do not divide by the downsampling (the upsampling matches the skips' sizes),
    # a scalar timestep and no mask
    x = torch.randn(2, 12, 10, 14)
    kw = {"encoder_hidden_states": kw["encoder_hidden_states"][:2],
          "class_labels": kw["class_labels"][:2]}
    torch.testing.assert_close(run(ours, x, 250.0, kw), run(ref, x, 250.0, kw), atol=1e-5,
                               rtol=0)


def test_gradients_and_checkpointing_match_diffusers() -> None:
    kwargs = tiny_kwargs()
    ref, ours = random_pair(kwargs)
    x, t, kw = inputs(kwargs)
    ref.train()
    ours.train()
    ref(x, t, **kw, return_dict=False)[0].square().mean().backward()
    ours.enable_gradient_checkpointing()
    ours(x, t, **kw, return_dict=False)[0].square().mean().backward()
    grads = dict(ours.named_parameters())
    for name, param in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, param.grad, atol=1e-5, rtol=1e-4)


def test_shipped_weights_load_with_every_key() -> None:
    from safetensors import safe_open

    ours = load_unet(SHIPPED_UNET)
    with safe_open(str(SHIPPED_UNET / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ours.state_dict())
    ref = diffusers.UNet2DConditionModel.from_pretrained(str(SHIPPED_UNET)).eval()
    assert list(ref.state_dict()) == list(ours.state_dict())
    kwargs = dict(ref.config)
    x, t, kw = inputs(kwargs, batch=2, side=32, tokens=24)
    assert torch.equal(run(ours, x, t, kw), run(ref, x, t, kw))  # bit for bit


def test_saved_folder_is_what_diffusers_writes(tmp_path: Path) -> None:
    kwargs = tiny_kwargs()
    ref, ours = random_pair(kwargs)
    ref.save_pretrained(str(tmp_path / "theirs"), safe_serialization=True)
    save_unet(ours, tmp_path / "ours")
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    mine = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert mine == theirs
    loaded = load_unet(tmp_path / "theirs")  # diffusers' folder into ours, and ours into theirs
    back = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "ours")).eval()
    x, t, kw = inputs(kwargs)
    want = run(ref, x, t, kw)
    assert torch.equal(run(loaded, x, t, kw), run(ours, x, t, kw))
    assert torch.equal(run(back, x, t, kw), want)
    save_unet(ours, tmp_path / "half", dtype=torch.float16)
    half = load_unet(tmp_path / "half", dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def test_defaults_are_diffusers_defaults() -> None:
    params = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    theirs = {name: list(p.default) if isinstance(p.default, tuple) else p.default
              for name, p in params.items() if name != "self"}
    assert theirs == DIFFUSERS_DEFAULTS


@pytest.mark.parametrize(("change", "field"), [
    ({"use_linear_projection": False}, "use_linear_projection"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"upcast_attention": True}, "upcast_attention"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"mid_block_type": "UNetMidBlock2D"}, "mid_block_type"),
    ({"down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")},
     "down_block_types"),
    ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
    ({"num_attention_heads": 4}, "num_attention_heads"),
    ({"dropout": 0.1}, "dropout"),
    ({"some_new_field": 1}, "some_new_field"),
])
def test_unsupported_config_is_refused_by_name(change, field) -> None:
    with pytest.raises(UnsupportedConfigError, match=field):
        unet_config(tiny_kwargs(**change))


def test_unsupported_config_in_a_folder_is_a_model_error(tmp_path: Path) -> None:
    import shutil

    from toile.errors import ModelFormatError
    from toile.families.toile.pipeline import ToilePipeline

    folder = tmp_path / "model"
    shutil.copytree(SHIPPED_UNET.parent, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(config | {"upcast_attention": True}))
    with pytest.raises(ModelFormatError, match="upcast_attention"):
        ToilePipeline.from_pretrained(folder)


def test_lora_applies_as_on_diffusers_unet(tmp_path: Path) -> None:
    """A toile LoRA file on the plain U-Net: the same output as on diffusers' class, and the
    base model again after the run."""
    from peft import LoraConfig

    from toile.families.toile.lora import loras_applied
    from toile.request import LoraSpec
    from toile.train.finetune.lora import save_lora

    kwargs = tiny_kwargs()
    ref, ours = random_pair(kwargs)
    source, _ = random_pair(kwargs)
    source.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"]))
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    path = save_lora(tmp_path / "lora.safetensors", {"unet": source}, {"family": "toile"})
    x, t, kw = inputs(kwargs)
    base = run(ours, x, t, kw)
    spec = (LoraSpec(str(path), 0.7),)
    with loras_applied(ref, spec):
        want = run(ref, x, t, kw)
    with loras_applied(ours, spec):
        got = run(ours, x, t, kw)
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not getattr(ours, "peft_config", None)
    assert torch.equal(run(ours, x, t, kw), base)
