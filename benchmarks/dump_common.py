"""Shared set-up for the stage-one benchmarks: a teacher directory built from a config, no network."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"


def wordpiece_tokenizer(vocab_size: int = 8000):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    lines = [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def bert_mlm_teacher(path: Path, *, size: str = "base") -> Path:
    """A randomly initialised BertForMaskedLM: 'base' = BERT-base shape (110M params, vocab 30522), 'tiny' = 2 layers x 64, tokenizer vocab."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok = wordpiece_tokenizer()
    shape = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072) if size == "base" \
        else dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    vocab = 30522 if size == "base" else len(tok)
    config = BertConfig(vocab_size=vocab, max_position_embeddings=512, pad_token_id=tok.pad_token_id, **shape)
    BertForMaskedLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
