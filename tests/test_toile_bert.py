"""toile's plain-PyTorch BERT and ``tokenizers`` tokenization (families/toile/bert.py) against
transformers' BertModel and tokenizer: same keys, same token states, same token ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from toile.families.toile.bert import (  # noqa: E402
    BertModel,
    BertTokenizer,
    UnsupportedConfigError,
    bert_config,
    load_bert,
    unsupported_reason,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "a red circle on a blue background",
    "",
    "Héllo WÖRLD!! naïve café 東京 ✓ emoji 🎨",
    "word " * 100,  # truncated
    "two green squares left of a yellow triangle, big-small; x=3.5 (ok)",
    "  leading and trailing spaces  ",
    "don't won't can't [CLS] [SEP] [PAD]",
]


def random_bert(folder: Path, **config) -> Path:
    """A tiny random transformers BertModel saved to ``folder`` (every tensor drawn)."""
    cfg = transformers.BertConfig(**({
        "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "max_position_embeddings": 40} | config))
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.3)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def reference(folder: Path):
    return transformers.AutoModel.from_pretrained(str(folder), local_files_only=True,
                                                  use_safetensors=True).eval()


@pytest.mark.parametrize("config", [{}, {"hidden_act": "gelu", "layer_norm_eps": 1e-5,
                                         "num_attention_heads": 2, "type_vocab_size": 1}])
def test_token_states_match_transformers(tmp_path: Path, config: dict) -> None:
    folder = random_bert(tmp_path / "bert", **config)
    ref, ours = reference(folder), load_bert(folder)
    assert list(ours.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 99, (4, 11), generator=g)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        for rows in (slice(None), slice(1, 2)):  # padded batch, and one row without padding
            want = ref(input_ids=ids[rows], attention_mask=mask[rows]).last_hidden_state
            got = ours(ids[rows], mask[rows])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_random_init_builds_a_working_model() -> None:
    model = BertModel({"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 8}).eval()
    assert model.embeddings.word_embeddings.weight.abs().sum() > 0
    assert model.embeddings.word_embeddings.weight[0].abs().sum() == 0  # padding_idx row
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 16)


@pytest.mark.parametrize(("change", "field"), [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"is_decoder": True}, "is_decoder"),
    ({"model_type": "roberta"}, "model_type"),
    ({"hidden_size": 32, "num_attention_heads": 5}, "hidden_size"),
])
def test_unsupported_config_is_refused_by_name(change: dict, field: str) -> None:
    with pytest.raises(UnsupportedConfigError, match=field):
        bert_config({"model_type": "bert"} | change)


def test_other_encoders_go_to_transformers(tmp_path: Path) -> None:
    folder = random_bert(tmp_path / "bert")
    assert unsupported_reason(folder) == "no tokenizer.json"
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(data | {"model_type": "roberta"}))
    assert "roberta" in unsupported_reason(folder)


def test_minilm_tokens_and_states_match_transformers() -> None:
    from toile.families.toile.text import minilm_folder

    try:
        folder = minilm_folder()
    except Exception:  # the package is a dependency; without it there is nothing to compare
        pytest.skip("all-MiniLM-L6-v2 is not installed")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    for max_tokens in (24, 8):
        batch = theirs(PROMPTS, padding="max_length", truncation=True, max_length=max_tokens,
                       return_tensors="pt")
        ids, mask = BertTokenizer(folder, max_tokens)(PROMPTS)
        assert torch.equal(ids, batch["input_ids"])
        assert torch.equal(mask, batch["attention_mask"])
    ref, ours = reference(folder), load_bert(folder)
    with torch.no_grad():
        want = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(ours(ids, mask), want.last_hidden_state, atol=1e-5, rtol=0)


def test_text_encoder_uses_toile_bert_and_matches_transformers(text_folder: Path,
                                                              tmp_path: Path) -> None:
    """TextEncoder on the tiny test encoder: toile's BERT, the same conditioning as the
    transformers path (forced by hiding tokenizer.json, which transformers does not need)."""
    from toile.families.toile.bert import BertModel as ToileBert
    from toile.families.toile.testing import tiny_model_config
    from toile.families.toile.text import TextEncoder

    config = tiny_model_config(text_folder).text
    light = TextEncoder(config)
    assert isinstance(light.model, ToileBert)
    folder = tmp_path / "no-tokenizer-json"
    shutil.copytree(text_folder, folder)
    (folder / "tokenizer.json").unlink()
    heavy = TextEncoder(type(config)(path=str(folder), max_tokens=config.max_tokens,
                                     dim=config.dim))
    assert not isinstance(heavy.model, ToileBert)
    a, b = light.encode(PROMPTS), heavy.encode(PROMPTS)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=0)
