"""Fine-tuning Stable Diffusion 1.x / 2.x (tiny random model): v-prediction checkpoints and full
fine-tuning. The cases every family shares are in ``test_finetune_families.py``."""

from __future__ import annotations

import pytest

from finetune_common import make_images


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-sd")
    return tiny_models("sd"), make_images(root / "images"), root


def test_v_prediction_checkpoints_train_on_v(setup, tmp_path):
    import json
    import shutil

    from finetune_common import config
    from toile.train.finetune.runner import FinetuneRunner

    model, images, _root = setup
    v_model = tmp_path / "sd-v"
    shutil.copytree(model, v_model)
    scheduler = v_model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text())
                                    | {"prediction_type": "v_prediction"}))
    runner = FinetuneRunner(config(v_model, images, tmp_path / "v.safetensors", steps=2),
                            command="test", echo=lambda _m: None)
    assert runner.objective.prediction_type == "v_prediction"
    result = runner.run()
    assert all(0.0 < loss < 100.0 for loss in result.losses)


def test_full_finetune_saves_a_model_folder(setup):
    from finetune_common import PROMPT, train
    from helpers import max_abs_diff
    from toile.engine.engine import Engine
    from toile.request import GenerationRequest

    model, images, root = setup
    out = root / "full"
    train(model, images, out, method="full", steps=2, lr=1e-3, train_text_encoder=True)
    engine = Engine(device="cpu")
    base = engine.run(GenerationRequest(PROMPT, model=str(model), steps=2, seed=0)).images[0]
    tuned = engine.run(GenerationRequest(PROMPT, model=str(out), steps=2, seed=0)).images[0]
    assert max_abs_diff(base, tuned) > 0
