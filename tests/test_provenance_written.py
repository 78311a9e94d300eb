"""Every written PNG carries the IPTC "trained algorithmic media" label; with a C2PA key and
certificate it is signed — by the CLI (created, or edited with the input as ingredient) and by
the server — and `toile verify` reads it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_c2pa import build_chain
from toile.safety.c2pa_credentials import read_iptc_digital_source_type, verify

TOILE = str(Path(sys.executable).parent / "toile")
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return build_chain(tmp_path_factory.mktemp("certs"))


def toile(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOILE_HOME=str(home))
    return subprocess.run([TOILE, *args], env=env, capture_output=True, text=True, timeout=300,
                          check=check)


def test_cli_labels_every_png_and_signs_with_a_key(tmp_path, certs, toile_home):
    plain = tmp_path / "plain.png"
    toile("generate", PROMPT, "--steps", "1", "-o", str(plain), home=toile_home)
    data = plain.read_bytes()
    assert "trainedAlgorithmicMedia" in (read_iptc_digital_source_type(data) or "")
    assert not verify(data).present
    signed = tmp_path / "signed.png"
    key = ("--c2pa-cert", str(certs["chain"]), "--c2pa-key", str(certs["key"]))
    toile("generate", PROMPT, "--steps", "1", "-o", str(signed), *key, home=toile_home)
    report = verify(signed.read_bytes())
    assert report.present and report.valid and "c2pa.created" in report.actions
    assert report.record["prompt"] == PROMPT  # the generation record, signed
    edited = tmp_path / "edited.png"
    toile("generate", "a green square", "--steps", "1", "--image", str(plain), "-o",
          str(edited), *key, home=toile_home)
    report = verify(edited.read_bytes())
    assert report.valid and "c2pa.edited" in report.actions and report.ingredients
    shown = toile("verify", str(edited), "--json", home=toile_home)
    assert json.loads(shown.stdout)["c2pa"]["valid"] is True
    half = toile("generate", PROMPT, "-o", str(tmp_path / "x.png"), "--c2pa-cert",
                 str(certs["chain"]), home=toile_home, check=False)
    assert half.returncode == 2 and "give both --c2pa-cert and --c2pa-key" in half.stderr


def test_the_server_signs_results(tmp_path, certs, tiny_models):
    from serve_helpers import MODEL, serve, tiny_engine, wait_job

    engine = tiny_engine(tiny_models("sd"), tmp_path)
    with serve(engine, tmp_path / "data", c2pa_cert=certs["chain"],
               c2pa_key=certs["key"]) as client:
        job_id = client.post("/v1/jobs", json={"prompt": "a cat", "model": MODEL, "steps": 1,
                                               "seed": 1}).json()["id"]
        job = wait_job(client, job_id)
        png = client.get(job["images"][0]["url"]).content
    report = verify(png)
    assert report.present and report.valid and report.record["seed"] == 1
