"""The Python API: ``toile.load(model).generate(prompt, **fields)``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toile.errors import RequestError
from toile.request import GenerationRequest, LoraSpec, Outpaint

if TYPE_CHECKING:
    from toile.engine.engine import Engine
    from toile.progress import ProgressCallback
    from toile.result import GenerationResult


class Generator:
    """A loaded model. ``generate`` takes the request fields by name and returns a result with
    ``.images`` (PIL) and ``.records`` (one per image)."""

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        engine: Engine | None = None,
    ) -> None:
        from toile.engine.engine import Engine

        self.engine = engine if engine is not None else Engine(device=device, dtype=dtype)
        self.model = model
        self.engine.load(model)  # load now, so errors surface here and generate() is fast

    def generate(
        self, prompt: str, *, progress: ProgressCallback | None = None, **fields: Any
    ) -> GenerationResult:
        return self.engine.run(build_request(prompt, model=self.model, **fields), progress=progress)


def build_request(prompt: str, **fields: Any) -> GenerationRequest:
    """A request from keyword fields, accepting the convenient forms: ``loras=[(path, scale)]``,
    ``outpaint=(left, top, right, bottom)``, and image/mask as PIL images or file paths."""
    unknown = set(fields) - set(GenerationRequest.field_names())
    if unknown:
        allowed = ", ".join(n for n in GenerationRequest.field_names() if n != "prompt")
        raise RequestError(sorted(unknown)[0], f"unknown field; the fields are: {allowed}")
    if "loras" in fields:
        fields["loras"] = tuple(_lora(item) for item in fields["loras"] or ())
    outpaint = fields.get("outpaint")
    if isinstance(outpaint, tuple | list):
        fields["outpaint"] = Outpaint(*outpaint)
    for name in ("image", "mask"):
        if isinstance(fields.get(name), str):
            from toile.io.images import load_mask, load_rgb

            loader = load_mask if name == "mask" else load_rgb
            fields[name] = loader(fields[name], field=name)
    return GenerationRequest(prompt=prompt, **fields)


def _lora(item: Any) -> LoraSpec:
    if isinstance(item, LoraSpec):
        return item
    if isinstance(item, str):
        return LoraSpec(item)
    if isinstance(item, tuple | list) and len(item) == 2:
        return LoraSpec(str(item[0]), float(item[1]))
    raise RequestError("loras", f"each LoRA must be a path or (path, scale), got {item!r}")
