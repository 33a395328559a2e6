"""Shared fixtures: tiny teachers built from configs, with tokenizers trained on bundled data.

Nothing here touches the network or ../shared: everything comes from data/ in this repo.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models run several times faster on one thread than on two (inter-op overhead dominates);
# set in the environment so subprocesses (kill -9, torchrun tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def single_thread_env() -> dict:
    """Environment for the tests' subprocesses (kill -9, torchrun): one thread, like the
    in-process runs they are compared with, so the arithmetic is the same."""
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread for every in-process test, even where OMP_NUM_THREADS was set
    otherwise: tiny models on 2 shared cores run ~5x faster, and runs compare bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
SMS = REPO / "data" / "sms_spam.tsv"


def shakespeare_lines(n: int | None = None) -> list[str]:
    lines = [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()]
    return lines[:n] if n else lines


def _wordpiece(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(shakespeare_lines(4000), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _byte_bpe(vocab_size: int):
    """Llama-style: byte-level BPE, BOS prepended, EOS and PAD tokens defined."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    tok.train_from_iterator(shakespeare_lines(4000), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=256)


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    return _wordpiece(400)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return _byte_bpe(400)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_mlm(tmp_path_factory, wordpiece_tokenizer) -> Path:
    """A BertForMaskedLM teacher directory (random weights, fixed seed)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(wordpiece_tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        pad_token_id=wordpiece_tokenizer.pad_token_id)
    return _save(BertForMaskedLM(config).eval(), wordpiece_tokenizer, tmp_path_factory.mktemp("bert_mlm"))


@pytest.fixture(scope="session")
def tiny_llama_clm(tmp_path_factory, bpe_tokenizer) -> Path:
    """A LlamaForCausalLM teacher directory (random weights, fixed seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = bpe_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    return _save(LlamaForCausalLM(config).eval(), tok, tmp_path_factory.mktemp("llama_clm"))


@pytest.fixture(scope="session")
def tiny_bert_cls(tmp_path_factory, wordpiece_tokenizer) -> Path:
    """A BertForSequenceClassification teacher directory (2 labels: ham/spam)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(wordpiece_tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        num_labels=2, id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1},
                        pad_token_id=wordpiece_tokenizer.pad_token_id)
    return _save(BertForSequenceClassification(config).eval(), wordpiece_tokenizer,
                 tmp_path_factory.mktemp("bert_cls"))


@pytest.fixture(scope="session")
def shakespeare_txt(tmp_path_factory) -> Path:
    """A small plain-text corpus: 300 non-empty lines of Tiny Shakespeare."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_small.txt"
    path.write_text("\n".join(shakespeare_lines(300)) + "\n")
    return path


@pytest.fixture(scope="session")
def sms_csv(tmp_path_factory) -> Path:
    """A small labelled corpus: 200 SMS messages as CSV with columns text,label (0 ham, 1 spam)."""
    path = tmp_path_factory.mktemp("sms") / "sms_small.csv"
    with open(SMS, newline="") as src, open(path, "w", newline="") as dst:
        reader = csv.reader(src, delimiter="\t")
        next(reader)
        writer = csv.writer(dst)
        writer.writerow(["text", "label"])
        for i, (label, text) in enumerate(reader):
            if i == 200:
                break
            writer.writerow([text, int(label == "spam")])
    return path
