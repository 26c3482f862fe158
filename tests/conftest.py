"""Shared fixtures: a tiny random LLaMA with its own small tokenizer, and sample text."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TEXT = (
    "The harbor town woke slowly in winter. Fishermen checked their nets by lamplight while "
    "the bakery on the corner pushed warm air into the street. Children ran along the quay, "
    "counting boats and arguing about which one would return first with a full hold. "
    "A clerk opened the shipping office, wrote the tides on a slate, and set a kettle to boil. "
)


@pytest.fixture(scope="session")
def sample_text() -> str:
    words = TEXT.split()
    gen = torch.Generator().manual_seed(1)
    # Shuffled sentences so windows differ; still natural words for the tokenizer.
    out = []
    for _ in range(200):
        idx = torch.randperm(len(words), generator=gen)[:30].tolist()
        out.append(" ".join(words[i] for i in idx) + ".")
    return "\n".join(out)


def make_tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def make_tiny_llama(path: Path, text: str, hidden=192, inter=320, layers=2, heads=3, kv_heads=1,
                    model_type="llama", seed=0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer(text)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=hidden,
                               intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads,
                               head_dim=hidden // heads, max_position_embeddings=512,
                               tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    # Outlier channels, as real LLMs have: scale a few norm weights so FMPQ has work to do.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:5] = 20.0
            layer.post_attention_layernorm.weight[-3:] = 15.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample_text) -> Path:
    """hidden 192 (not a multiple of 128: exercises padding), intermediate 320, 2 layers."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", sample_text)


@pytest.fixture(scope="session")
def calib_dir(tiny_model, text_file, tmp_path_factory):
    """Calibration of the tiny model (8 x 64 tokens, with Hessians)."""
    from comet_quant.calibrate import CalibrationConfig, calibrate

    out = tmp_path_factory.mktemp("cal") / "calib"
    return calibrate(str(tiny_model), out, CalibrationConfig(dataset=str(text_file), hessians=True,
                                                             nsamples=8, seqlen=64, batch_size=4))


@pytest.fixture(scope="session")
def checkpoint(tiny_model, calib_dir, tmp_path_factory):
    """The tiny model exported with FMPQ (25% 8-bit groups), GPTQ weights and KV4."""
    from comet_quant.export import export
    from comet_quant.scheme import get_scheme

    out = tmp_path_factory.mktemp("ckpt") / "q"
    return export(str(tiny_model), calib_dir, get_scheme("w4ax-kv4", a8_budget=0.25), out)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, sample_text) -> Path:
    p = tmp_path_factory.mktemp("data") / "sample.txt"
    p.write_text(sample_text)
    return p


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests use a private model cache (the default-model test points it back) and no hub."""
    monkeypatch.setenv("COMET_QUANT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
