"""The prompt policy: robust matching with explained verdicts, TOML rules, the engine check
before any model work, the server's refusal and audit log, and the CLI's switches."""

from __future__ import annotations

import hashlib
import json

import pytest

from toile.errors import ToileError
from toile.request import GenerationRequest
from toile.safety.policy import Action, Policy, PolicyError

BLOCKED = "minors-sexual-terms"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.default()


@pytest.mark.parametrize(
    ("prompt", "matched"),
    [
        ("loli art", "loli"),
        ("LOLI Art", "LOLI"),  # case
        ("l0l1 art", "l0l1"),  # l33t
        ("l.o.l.i art", "l.o.l.i"),  # punctuation inside the word
        ("l o l i art", "l o l i"),  # spacing inside the word
        ("lo\u200bli art", "lo\u200bli"),  # zero-width space
        ("lólí art", "lólí"),  # accents
        ("ｌｏｌｉ art", "ｌｏｌｉ"),  # full-width forms
        ("two lolis", "lolis"),  # plural
        ("a 12 year old, nude", "12 year old, nude"),  # a pattern with numbers
    ],
)
def test_blocked_in_every_spelling_with_the_span(policy, prompt, matched):
    verdict = policy.check(prompt)
    blocked = verdict.blocked
    assert blocked is not None and blocked.action is Action.BLOCK
    assert blocked.text == matched and prompt[slice(*blocked.span)] == matched


@pytest.mark.parametrize(
    "prompt",
    ["a red circle on a blue background", "a child eating a lollipop", "Scunthorpe at dusk",
     "a classic car", "the lolita dress style", "a grapefruit", "an infant in a crib",
     "a 25 year old, nude statue"],  # the last warns (sexual) but blocks nothing
)
def test_no_block_inside_other_words_or_innocent_contexts(policy, prompt):
    assert policy.check(prompt).blocked is None


def test_warnings_are_explained(policy):
    verdict = policy.check("a nude marble statue")
    assert verdict.blocked is None
    [warning] = verdict.warnings
    assert (warning.rule, warning.category, warning.text) == ("sexual-content", "sexual", "nude")
    assert warning.to_dict() == {"rule": "sexual-content", "category": "sexual",
                                 "action": "warn", "span": [2, 6]}


def test_deployment_files_add_override_or_replace(tmp_path, policy):
    extra = tmp_path / "policy.toml"
    extra.write_text(
        '[[rule]]\nid = "brand"\ncategory = "trademark"\naction = "block"\n'
        'terms = ["acme corp"]\n\n'
        '[[rule]]\nid = "sexual-content"\ncategory = "sexual"\naction = "block"\n'
        'terms = ["nude"]\n'
    )
    merged = Policy.from_file(extra, base=policy)
    assert merged.check("an ACME-corp logo").blocked.rule == "brand"
    assert merged.check("a nude statue").blocked.rule == "sexual-content"  # overridden by id
    assert len(merged.rules) == len(policy.rules) + 1
    extra.write_text('replace_defaults = true\n' + extra.read_text())
    replaced = Policy.from_file(extra, base=policy)
    assert [r.id for r in replaced.rules] == ["brand", "sexual-content"]
    assert replaced.check("loli").blocked is None
    for bad, message in (('[[rule]]\nid = "x"\naction = "ban"\nterms = ["a"]', "action must"),
                         ('[[rule]]\nid = "x"\npatterns = ["("]', "bad pattern"),
                         ('[[rule]]\nid = "x"', "give terms or patterns"),
                         ("not toml = = 1", "not valid TOML")):
        extra.write_text(bad)
        with pytest.raises(ToileError, match=message):
            Policy.from_file(extra)


def test_the_engine_checks_before_any_model_work():
    from toile.engine.engine import Engine

    engine = Engine(device="cpu")
    with pytest.raises(PolicyError) as info:  # the model does not exist: nothing was loaded
        engine.run(GenerationRequest("l.o.l.i", model="no-such-model", steps=1))
    assert info.value.field == "prompt" and BLOCKED in str(info.value)
    assert "loli" not in str(info.value)  # the rule's terms are not shown
    result = engine.run(GenerationRequest("a nude statue of a circle", steps=1, seed=1))
    assert result.records[0].safety["policy"]["warnings"][0]["rule"] == "sexual-content"
    off = Engine(device="cpu", policy=None)
    assert "policy" not in off.run(GenerationRequest("l.o.l.i", steps=1, seed=1)).records[0].safety


def test_the_server_refuses_at_submit_and_audits(tmp_path, tiny_models):
    from serve_helpers import MODEL, serve, tiny_engine, wait_job

    engine = tiny_engine(tiny_models("sd"), tmp_path)
    body = {"prompt": "a l0l1 drawing", "model": MODEL, "steps": 1, "seed": 1}
    with serve(engine, tmp_path / "data") as client:
        refused = client.post("/v1/jobs", json=body)
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["field"] == "prompt" and BLOCKED in error["message"]
        assert "loli" not in error["message"].lower()
        assert client.get("/v1/jobs").json()["jobs"] == []
        warned = client.post("/v1/jobs", json={**body, "prompt": "a nude statue"})
        assert warned.status_code == 202
        job = wait_job(client, warned.json()["id"])
        assert job["images"][0]["record"]["safety"]["policy"]["warnings"][0]["rule"] == (
            "sexual-content")
    lines = [json.loads(x) for x in (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    assert [line["outcome"] for line in lines] == ["refused", "warned"]
    assert lines[0]["rules"] == [{"rule": BLOCKED, "category": "sexual-minors"}]
    assert lines[0]["prompt_sha256"] == hashlib.sha256(b"a l0l1 drawing").hexdigest()
    assert lines[0]["client"] and "l0l1" not in json.dumps(lines)  # hash only, never the text
    with serve(engine, tmp_path / "data2", policy_enabled=False) as client:
        assert client.post("/v1/jobs", json=body).status_code == 202


def test_cli_switches(toile_home, tmp_path):
    from test_cli import toile

    out = str(tmp_path / "x.png")
    refused = toile("generate", "l.o.l.i", "--steps", "1", "-o", out, home=toile_home,
                    check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert f"rule {BLOCKED}" in refused.stderr
    toile("generate", "l.o.l.i", "--steps", "1", "-o", out, "--no-policy", home=toile_home)
    extra = tmp_path / "mine.toml"
    extra.write_text('[[rule]]\nid = "no-squares"\ncategory = "house"\nterms = ["square"]\n')
    mine = toile("generate", "a red square", "--steps", "1", "-o", out, "--policy", str(extra),
                 home=toile_home, check=False)
    assert mine.returncode == 2 and "rule no-squares" in mine.stderr
