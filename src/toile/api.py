"""The Python API: ``toile.load(model).generate(prompt, **fields)``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toile.errors import RequestError
from toile.request import GenerationRequest, LoraSpec, Outpaint, Task

if TYPE_CHECKING:
    from toile.engine.engine import Engine
    from toile.progress import ProgressCallback
    from toile.result import GenerationResult


class Generator:
    """A loaded model. ``generate``, ``edit`` and ``upscale`` take the request fields by name
    and return a result with ``.images`` (PIL) and ``.records`` (one per image); ``caption``
    and ``ask`` return the text. With no model, the task's default model is used."""

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
        if model is not None:  # load now, so errors surface here and the first call is fast
            self.engine.load(model)

    def generate(
        self, prompt: str, *, progress: ProgressCallback | None = None, **fields: Any
    ) -> GenerationResult:
        return self.engine.run(build_request(prompt, model=self.model, **fields), progress=progress)

    def edit(self, image: Any, instruction: str, *, progress: ProgressCallback | None = None,
             **fields: Any) -> GenerationResult:
        """Edit ``image`` (PIL image or path) as ``instruction`` says; ``.images``."""
        request = build_request(instruction, model=self.model, task=Task.EDIT, image=image,
                                **fields)
        return self.engine.run(request, progress=progress)

    def upscale(self, image: Any, *, scale: float | None = None, prompt: str = "",
                progress: ProgressCallback | None = None, **fields: Any) -> GenerationResult:
        """``image`` made ``scale`` times larger (default: the model's factor); ``.images``."""
        request = build_request(prompt, model=self.model, task=Task.UPSCALE, image=image,
                                scale=scale, **fields)
        return self.engine.run(request, progress=progress)

    def caption(self, image: Any, *, detail: str = "short", **fields: Any) -> str:
        """One caption of ``image`` (``detail``: short or long)."""
        request = build_request("", model=self.model, task=Task.CAPTION, image=image,
                                detail=detail, **fields)
        return self.engine.run(request).texts[0]

    def ask(self, image: Any, question: str, **fields: Any) -> str:
        """The answer to ``question`` about ``image``."""
        request = build_request("", model=self.model, task=Task.ANSWER, image=image,
                                question=question, **fields)
        return self.engine.run(request).texts[0]


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
