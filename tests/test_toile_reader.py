"""toile's own reader: the network, its folder, the engine's caption and answer tasks through
it, and its training loop (determinism, resume)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from test_cli import toile
from toile.data.reader_text import vocabulary
from toile.data.varied_render import varied_picture
from toile.engine.engine import Engine
from toile.engine.models import ModelRegistry
from toile.families.toile.reader_model import (
    EOS,
    ToileReader,
    build_tokenizer,
    detokenize,
    prepare_image,
)
from toile.families.toile.reader_net import EncoderKind, ReaderNet, ReaderNetConfig
from toile.request import GenerationRequest
from toile.train.reader_train import (
    ReaderTrainConfig,
    ReaderTrainer,
    make_batch,
    write_reader_folder,
)

TINY = {"width": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1, "max_tokens": 40}


def tiny_net(seed: int = 0, encoder: EncoderKind = EncoderKind.CONV) -> ReaderNet:
    torch.manual_seed(seed)
    return ReaderNet(ReaderNetConfig(vocab_size=len(vocabulary()), encoder=encoder, **TINY))


@pytest.fixture
def reader_folder(tmp_path):
    folder = tmp_path / "reader"
    write_reader_folder(tiny_net(), build_tokenizer(), folder, {"steps": 0})
    return folder


def test_config_round_trips_and_greedy_is_deterministic():
    net = tiny_net()
    assert ReaderNetConfig.from_json(json.loads(json.dumps(net.config.to_json()))) == net.config
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    prompt = torch.tensor([[2, 10, 3], [2, 11, 3]])
    first = net.greedy(image, prompt, EOS, 12)
    assert first == net.greedy(image, prompt, EOS, 12)
    assert len(first) == 2 and all(len(row) <= 12 and EOS not in row for row in first)
    for kind in EncoderKind:  # both encoders give [B, T, V] logits
        logits = tiny_net(encoder=kind)(image, prompt)
        assert logits.shape == (2, 3, len(vocabulary()))


def test_images_are_padded_to_square_and_resized():
    wide = Image.new("RGB", (120, 60), (0, 0, 255))
    wide.paste((255, 0, 0), (50, 20, 70, 40))
    prepared = prepare_image(wide, 64)
    assert prepared.pixels.shape == (1, 3, 64, 64)
    assert "padded to 120x120 with the border colour" in prepared.note
    assert "resized to 64x64" in prepared.note
    # the padding is the border's blue, and the red square stays square (about 11 px)
    assert prepared.pixels[0, :, 2, 2].tolist() == pytest.approx([-1, -1, 1])
    red = (prepared.pixels[0, 0] > 0.5) & (prepared.pixels[0, 2] < 0)
    rows, cols = red.nonzero(as_tuple=True)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1
    assert prepare_image(Image.new("L", (64, 64)), 64).note == "L 64x64"


def test_detokenize_joins_punctuation():
    assert detokenize(["a", "red", "circle", ".", "the", "red", "circle", ",", "14"]) == \
        "a red circle. the red circle, 14"


def test_engine_captions_and_answers_with_a_reader_folder(reader_folder, tmp_path):
    registry = ModelRegistry(tmp_path / "models.json")
    registry.add("my-reader", reader_folder)
    engine = Engine(registry, policy=None)
    image = varied_picture(random.Random(1)).image
    direct = ToileReader.load(reader_folder)
    result = engine.run(GenerationRequest("", task="caption", image=image, model="my-reader",
                                          seed=3))
    assert result.texts == [direct.caption(image)]
    record = result.records[0]
    assert (record.family, record.variant, record.task) == ("toile", "reader", "caption")
    assert record.input_note.startswith(f"RGB {image.width}x{image.height}")
    long = engine.run(GenerationRequest("", task="caption", image=image, model="my-reader",
                                        detail="long"))
    assert long.texts == [direct.caption(image, long=True)]
    answer = engine.run(GenerationRequest("", task="answer", image=image, model="my-reader",
                                          question="how many circles are there?"))
    assert answer.texts == [direct.answer(image, "how many circles are there?")]
    assert answer.records[0].question == "how many circles are there?"
    with pytest.raises(Exception, match="txt2img"):
        engine.run(GenerationRequest("a red circle", model="my-reader"))


def test_builtin_reader_is_the_caption_default(toile_home, tmp_path):
    source = tmp_path / "in.png"
    varied_picture(random.Random(4)).image.save(source)
    proc = toile("caption", str(source), "--json", home=toile_home)
    record = json.loads(proc.stdout)["captions"][0]["record"]
    assert record["model_id"] == "toile-reader" and record["text"]
    proc = toile("ask", str(source), "what colour is the background?", home=toile_home)
    assert proc.stdout.strip()


def test_batches_are_deterministic_and_targets_align():
    config = ReaderTrainConfig(out="unused", batch_size=6, seed=1)
    tokenizer = build_tokenizer()
    pixels, tokens, targets = make_batch(config, 7, tokenizer, 64, 96)
    again = make_batch(config, 7, tokenizer, 64, 96)
    assert torch.equal(pixels, again[0]) and torch.equal(tokens, again[1])
    assert not torch.equal(tokens, make_batch(config, 8, tokenizer, 64, 96)[1])
    assert pixels.shape == (6, 3, 64, 64) and tokens.shape == targets.shape
    for row, target in zip(tokens.tolist(), targets.tolist(), strict=True):
        sep = row.index(3)  # [SEP]
        assert all(t == 0 for t in target[:sep])  # no loss on the prompt
        words = [t for t in target[sep:] if t != 0]
        assert words[-1] == EOS and row[sep + 1:sep + len(words)] == words[:-1]


def test_training_resumes_where_it_stopped(tmp_path, one_torch_thread):
    def trainer(out: str, steps: int) -> ReaderTrainer:
        config = ReaderTrainConfig(out=str(tmp_path / out), steps=steps, batch_size=4,
                                   warmup=1, width=32)
        return ReaderTrainer(config)

    straight = trainer("a", 3)
    straight.train(progress=False)
    first = trainer("b", 2)
    first.train(progress=False)
    resumed = trainer("b", 3)
    assert resumed.resume() and resumed.step == 2
    resumed.train(progress=False)
    for name, tensor in straight.net.state_dict().items():
        assert torch.allclose(tensor, resumed.net.state_dict()[name], atol=1e-6), name
    log = (tmp_path / "b" / "log.jsonl").read_text()
    assert log == "" or "loss" in log
