"""Fine-tuning a model on a handful of images: LoRA (Hu et al. 2021) or full, DreamBooth-style
(Ruiz et al. 2022) with optional prior preservation, for SD 1.x/2.x, SDXL, SD3, FLUX.1 and
toile's own models. ``toile finetune`` is the command; the modules are:

- ``config``     — :class:`FinetuneConfig`, every setting of a run (typed, validated);
- ``dataset``    — the image folder with captions (kohya's ``name.txt`` beside ``name.png``);
- ``prior``      — class images for prior preservation, generated through the engine and cached;
- ``lora``       — peft adapters on the attention projections, and the one-file LoRA format;
- ``objectives`` — the training loss of each family (epsilon / v / flow matching / rectified flow);
- ``runner``     — the accelerate loop: progress, checkpoints, exact ``--resume``;
- ``demo``       — teaching the built-in model a held-out concept, measured before and after.

Nothing is imported here: torch, diffusers and peft load when a run starts.
"""
