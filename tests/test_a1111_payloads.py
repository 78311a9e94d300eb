"""AUTOMATIC1111's own txt2img API test payloads (its ``test/test_txt2img.py``: the same
request body and the same variations, written out here as data) against ``toile serve`` with a
diffusers model as the default. Each must answer 200, as A1111's tests assert — except face
restoration, which needs a face-restoration model toile does not have: a 422 naming the field."""

from __future__ import annotations

import json

import pytest

from serve_helpers import MODEL, ScriptedEngine, live_server

pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIMPLE = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
    "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1,
    "negative_prompt": "", "prompt": "example prompt", "restore_faces": False, "s_churn": 0,
    "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a", "seed": -1,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3, "styles": [],
    "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64,
}
VARIATIONS = {
    "simple": {},
    "negative prompt": {"negative_prompt": "example negative prompt"},
    "complex prompt": {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], "
                                 "[from:to:0.3], [alt|alt1]"},
    "not square": {"height": 128},
    "hires fix": {"enable_hr": True},
    "tiling": {"tiling": True},
    "PLMS": {"sampler_index": "PLMS"},
    "DDIM": {"sampler_index": "DDIM"},
    "UniPC": {"sampler_index": "UniPC"},
    "multiple batches": {"n_iter": 2},
    "batch": {"batch_size": 2},
}


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    from serve_helpers import tiny_engine

    engine = tiny_engine(tiny_models("sd"), tmp_path_factory.mktemp("a1111-payloads"))
    path = engine.registry.path
    path.write_text(json.dumps({**json.loads(path.read_text()), "default": MODEL}))
    return engine


def test_a1111_txt2img_test_payloads(engine, tmp_path):
    import requests

    with live_server(ScriptedEngine(engine), tmp_path / "data") as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
        for name, changes in VARIATIONS.items():
            response = requests.post(url, json={**SIMPLE, **changes}, timeout=300)
            assert response.status_code == 200, (name, response.text)
            images = response.json()["images"]
            assert len(images) == changes.get("batch_size", 1) * changes.get("n_iter", 1)
        response = requests.post(url, json={**SIMPLE, "restore_faces": True}, timeout=60)
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "restore_faces"
        assert requests.post(url, json=SIMPLE, timeout=300).status_code == 200
