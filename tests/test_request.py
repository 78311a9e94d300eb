"""GenerationRequest validation: every bad value names its field and the allowed range."""

from __future__ import annotations

import pytest
from PIL import Image

from toile.api import build_request
from toile.errors import ImageInputError, RequestError, UnsupportedModeError
from toile.request import GenerationRequest, LoraSpec, Mode, Outpaint
from toile.resolve import FamilyDefaults, resolve


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 0}, r"steps: must be an integer in \[1, 1000\]"),
        ({"steps": 2.5}, r"steps: must be an integer"),
        ({"guidance": -1.0}, r"guidance: must be in \[0.0, 100.0\]"),
        ({"guidance": float("nan")}, r"guidance: must be in"),
        ({"width": 4}, r"width: must be an integer in \[8, 8192\]"),
        ({"height": 100_000}, r"height: must be an integer in \[8, 8192\]"),
        ({"seed": -1}, r"seed: must be an integer in \[0, "),
        ({"num_images": 17}, r"num_images: must be an integer in \[1, 16\]"),
        ({"negative_prompt": 3}, r"negative_prompt: must be a string"),
    ],
)
def test_field_ranges(fields, message):
    with pytest.raises(RequestError, match=message) as info:
        GenerationRequest("a cat", **fields)
    assert info.value.field == message.split(":")[0]


def test_strength_needs_image_and_range():
    image = Image.new("RGB", (16, 16))
    with pytest.raises(RequestError, match=r"strength: must be in \(0.0, 1.0\]"):
        GenerationRequest("a", image=image, strength=0.0)
    with pytest.raises(RequestError, match="strength: only applies with an input image"):
        GenerationRequest("a", strength=0.5)


def test_mask_rules():
    image = Image.new("RGB", (16, 16))
    with pytest.raises(ImageInputError, match="mask: size 8x8 differs from the image's 16x16"):
        GenerationRequest("a", image=image, mask=Image.new("L", (8, 8)))
    with pytest.raises(RequestError, match="mask: inpainting needs an input image"):
        GenerationRequest("a", mask=Image.new("L", (16, 16)))
    with pytest.raises(RequestError, match="outpaint: cannot be combined with mask"):
        GenerationRequest("a", image=image, mask=Image.new("L", (16, 16)), outpaint=Outpaint(8))


def test_modes_follow_inputs():
    image = Image.new("RGB", (16, 16))
    assert GenerationRequest("a").mode is Mode.TXT2IMG
    assert GenerationRequest("a", image=image).mode is Mode.IMG2IMG
    assert GenerationRequest("a", image=image, mask=Image.new("L", (16, 16))).mode is Mode.INPAINT
    assert GenerationRequest("a", image=image, outpaint=Outpaint(0, 8)).mode is Mode.OUTPAINT


def test_outpaint_and_lora_parsing():
    assert Outpaint.parse("8, 0,16,4") == Outpaint(8, 0, 16, 4)
    with pytest.raises(RequestError, match="outpaint: expected LEFT,TOP,RIGHT,BOTTOM"):
        Outpaint.parse("8,8")
    with pytest.raises(RequestError, match="outpaint: at least one margin"):
        Outpaint.parse("0,0,0,0")
    with pytest.raises(RequestError, match=r"outpaint.left: must be an integer in \[0, 8192\]"):
        Outpaint(-1, 0, 0, 0)
    assert LoraSpec.parse("style.safetensors:0.5") == LoraSpec("style.safetensors", 0.5)
    assert LoraSpec.parse("C:/x/style.safetensors") == LoraSpec("C:/x/style.safetensors", 1.0)
    with pytest.raises(RequestError, match=r"loras.scale: must be in \[-10.0, 10.0\]"):
        LoraSpec("a.safetensors", 50)


def test_resolve_fills_defaults_and_checks_family_limits():
    defaults = FamilyDefaults(
        modes=frozenset({Mode.TXT2IMG}),
        width=64,
        height=48,
        steps=30,
        guidance=4.0,
        size_multiple=16,
        max_pixels=256 * 256,
    )
    resolved = resolve(GenerationRequest("a", seed=9, num_images=3), defaults, "test")
    assert (resolved.width, resolved.height, resolved.steps, resolved.guidance) == (64, 48, 30, 4.0)
    assert resolved.seeds == (9, 10, 11)
    with pytest.raises(RequestError, match="width: 72 must be a multiple of 16"):
        resolve(GenerationRequest("a", width=72), defaults, "test")
    with pytest.raises(RequestError, match="exceeds the budget of 65536 pixels"):
        resolve(GenerationRequest("a", width=512, height=512), defaults, "test")
    image = Image.new("RGB", (64, 64))
    with pytest.raises(UnsupportedModeError, match="img2img is not supported by the test family"):
        resolve(GenerationRequest("a", image=image), defaults, "test")


def test_build_request_names_unknown_fields():
    with pytest.raises(RequestError, match="cfg_scale: unknown field; the fields are: "):
        build_request("a", cfg_scale=7)
    request = build_request(
        "a", loras=[("x.safetensors", 0.5)], outpaint=(8, 0, 0, 0), image=Image.new("RGB", (8, 8))
    )
    assert request.loras == (LoraSpec("x.safetensors", 0.5),)
    assert request.outpaint == Outpaint(8, 0, 0, 0)
