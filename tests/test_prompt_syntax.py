"""A1111 prompt syntax: the parser against A1111's documented examples, CLIP weighting against
diffusers' own encode_prompt, long prompts, and what families without weights do."""

from __future__ import annotations

import pytest
import torch

from helpers import max_abs_diff
from toile.engine.engine import Engine
from toile.errors import RequestError
from toile.prompt_syntax import (
    has_editing,
    joint_schedule,
    parse,
    plain_text,
    prompt_schedule,
    text_at,
)
from toile.request import GenerationRequest


def pieces(prompt: str) -> list[tuple[str, float]]:
    return [(p.text, round(p.weight, 6)) for p in parse(prompt)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [  # A1111's documented behaviour (its parse_prompt_attention examples)
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
         [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
          (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
        ("[faint] and )stray", [("faint", 0.909091), (" and )stray", 1.0)]),
        ("a cat BREAK a dog", [("a cat ", 1.0), ("BREAK", -1.0), (" a dog", 1.0)]),
    ],
)
def test_parser_reads_a1111_emphasis(prompt, expected):
    assert pieces(prompt) == expected


def test_plain_text_drops_the_syntax():
    assert plain_text("a ((red:1.3)) cat BREAK [on] a \\(mat\\)") == "a red cat on a (mat)"


@pytest.mark.parametrize(
    ("prompt", "steps", "expected"),
    [  # A1111's own examples (prompt_parser.get_learned_conditioning_prompt_schedules)
        ("test", 10, [(10, "test")]),
        ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
        ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", 10, [(10, "a [unbalanced")]),
        ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", 4, [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]),
        ("[fe|]male", 3, [(1, "female"), (2, "male"), (3, "female")]),
        ("[fe|||]male", 6, [(1, "female"), (4, "male"), (5, "female"), (6, "male")]),
        # [from::when] removes, [to:when] adds; a decimal point makes a fraction of the steps
        ("[from::2] x", 4, [(2, "from x"), (4, " x")]),
        ("[cat:dog:0.5]", 4, [(2, "cat"), (4, "dog")]),
        ("[cat:dog:1.0]", 4, [(4, "cat")]),  # a fraction of 1: never switches
        ("[cat:dog:9]", 4, [(4, "cat")]),  # past the last step: capped, never switches
        ("[cat:dog:0]", 4, [(4, "dog")]),
        ("[cat:dog:0.1]", 4, [(4, "dog")]),  # int(0.4) = 0
        # nesting, and editing inside emphasis
        ("[[a|b]:c:2]", 3, [(1, "a"), (2, "b"), (3, "c")]),
        ("([red:blue:1] cat:1.2)", 2, [(1, "(red cat:1.2)"), (2, "(blue cat:1.2)")]),
        ("\\[a:b:1\\] [x|y]", 2, [(1, "\\[a:b:1\\] x"), (2, "\\[a:b:1\\] y")]),
    ],
)
def test_prompt_schedule_follows_a1111(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


def test_a1111_test_payload_prompt():
    # The prompt of A1111's own API test payload, at 3 steps.
    prompt = "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"
    schedule = prompt_schedule(prompt, 3)
    assert schedule == [
        (1, "((emphasis)), (emphasis1:1.1), , from, to, alt"),
        (2, "((emphasis)), (emphasis1:1.1), to, from, to, alt1"),
        (3, "((emphasis)), (emphasis1:1.1), to, , to, alt"),
    ]
    assert has_editing(prompt)
    # Each step's text is read for emphasis as any prompt is.
    assert pieces(schedule[1][1])[:3] == [("emphasis", 1.21), (", ", 1.0), ("emphasis1", 1.1)]
    GenerationRequest(prompt)  # accepted


def test_joint_schedule_merges_both_prompts():
    assert joint_schedule("a [b|c]", "x [y:z:1]", 4) == [
        (1, "a b", "x y"), (2, "a c", "x z"), (3, "a b", "x z"), (4, "a c", "x z")]
    assert joint_schedule("a cat", "", 5) == [(5, "a cat", "")]
    assert text_at(prompt_schedule("[a:b:2]", 4), 3) == "b"


def test_has_editing():
    assert has_editing("[a:b:2]") and has_editing("x [a|b]") and has_editing("[a::0.5]")
    for prompt in ("plain", "(a:1.2) [faint]", "a \\[b:c:2\\]", "a [b:c", "(a|b)"):
        assert not has_editing(prompt), prompt


@pytest.mark.parametrize("prompt", ["a [cat:dog] in a box", "[a|b:2]", "[a:b:c]", "[a:b:1:2]"])
def test_malformed_editing_is_refused_not_kept_as_text(prompt):
    with pytest.raises(RequestError) as info:
        GenerationRequest(prompt)
    assert info.value.field == "prompt" and "prompt editing" in str(info.value)
    with pytest.raises(RequestError) as info:
        GenerationRequest("ok", negative_prompt=prompt)
    assert info.value.field == "negative_prompt"
    GenerationRequest("a \\[cat:dog\\] sign")  # escaped brackets are literal text


@pytest.mark.parametrize("prompt", ["a [cat:dog:0.5]", "a [cat|dog] in a box", "[x::3]"])
def test_prompt_editing_and_alternation_are_accepted(prompt):
    assert GenerationRequest(prompt, negative_prompt=prompt).prompt == prompt


@pytest.fixture(scope="module")
def sd_pipe(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models("sd")), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models("sdxl")),
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_unweighted_embeddings_equal_diffusers_encode_prompt(sd_pipe, sdxl_pipe):
    from toile.families.clip_prompts import weighted_prompt_kwargs

    ours = weighted_prompt_kwargs(sd_pipe, "a red cat", "a dog")
    theirs = sd_pipe.encode_prompt("a red cat", "cpu", 1, True, "a dog")
    assert torch.allclose(ours["prompt_embeds"], theirs[0], atol=1e-6)
    assert torch.allclose(ours["negative_prompt_embeds"], theirs[1], atol=1e-6)
    ours = weighted_prompt_kwargs(sdxl_pipe, "a red cat", "")
    embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(
        "a red cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert torch.allclose(ours["prompt_embeds"], embeds, atol=1e-6)
    assert torch.allclose(ours["pooled_prompt_embeds"], pooled, atol=1e-6)
    assert torch.equal(ours["negative_prompt_embeds"], negative)  # zeros, as SDXL does
    assert torch.equal(ours["negative_pooled_prompt_embeds"], negative_pooled)


def test_a_weight_scales_its_tokens_and_keeps_the_mean(sd_pipe):
    from toile.families.clip_prompts import weighted_prompt_kwargs

    plain = weighted_prompt_kwargs(sd_pipe, "a red cat", "")["prompt_embeds"]
    weighted = weighted_prompt_kwargs(sd_pipe, "a (red:1.5) cat", "")["prompt_embeds"]
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
    ratio = weighted[0] / plain[0]  # [77, D]: one constant per token
    red = len(sd_pipe.tokenizer("a", add_special_tokens=False).input_ids) + 1  # after BOS
    rescale = ratio[0].mean()  # BOS has weight 1: only the mean-keeping factor
    assert torch.allclose(ratio[red], 1.5 * rescale, rtol=1e-4)
    assert torch.allclose(ratio[red + 1], rescale, rtol=1e-4)


def test_long_prompts_and_break_make_more_chunks(sd_pipe, sdxl_pipe):
    from toile.families.clip_prompts import weighted_prompt_kwargs

    long = " ".join(["a red cat"] * 40)  # 120 tokens: two chunks of 75
    kwargs = weighted_prompt_kwargs(sd_pipe, long, "blurry")
    assert kwargs["prompt_embeds"].shape[1] == kwargs["negative_prompt_embeds"].shape[1] == 154
    kwargs = weighted_prompt_kwargs(sdxl_pipe, "a cat BREAK a dog", long)
    assert kwargs["prompt_embeds"].shape[1] == 154  # padded to the negative's two chunks


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", cache_size=3)


def test_clip_families_weight_and_record_the_pieces(engine, tiny_models):
    for family in ("sd", "sdxl"):
        model = str(tiny_models(family))
        plain = engine.run(GenerationRequest("a red cat", model=model, steps=2, seed=3))
        weighted = engine.run(GenerationRequest("a (red:1.6) cat", model=model, steps=2, seed=3))
        assert max_abs_diff(plain.images[0], weighted.images[0]) > 0, family
        record = weighted.records[0]
        assert record.prompt == "a (red:1.6) cat"
        assert record.prompt_weights == (("a ", 1.0), ("red", 1.6), (" cat", 1.0))
        assert plain.records[0].prompt_weights == ()
        long = engine.run(GenerationRequest(" ".join(["a red cat"] * 40), model=model, steps=1))
        assert long.images[0].size == plain.images[0].size


def test_encoders_without_weights_get_the_plain_words(engine, tiny_models):
    sd3 = str(tiny_models("sd3"))
    plain = engine.run(GenerationRequest("a red cat", model=sd3, steps=2, seed=3))
    syntax = engine.run(GenerationRequest("a ((red:1.6)) [cat]", model=sd3, steps=2, seed=3))
    assert max_abs_diff(plain.images[0], syntax.images[0]) == 0  # never literal brackets
    record = syntax.records[0]
    assert record.prompt == "a ((red:1.6)) [cat]" and record.prompt_weights == ()
    assert "syntax removed" in record.prompt_note and "'a red cat'" in record.prompt_note
