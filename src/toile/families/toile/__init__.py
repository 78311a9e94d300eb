"""toile's own text-to-image models (``toile-mini``): config, denoiser, text encoder, sampler,
pipeline and the ``Family`` adapter. Imported lazily by the family registry."""
