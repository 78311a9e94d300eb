"""Training toile's own models from scratch on the scene world (accelerate), checkpoints and
export to the inference folder. Imported lazily (``toile train``)."""
