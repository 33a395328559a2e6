"""The shared fixtures build loadable teachers whose tokenizer and model agree."""
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer


def test_teachers_load_and_run(tiny_bert_mlm, tiny_llama_clm, tiny_bert_cls):
    for path, auto in ((tiny_bert_mlm, AutoModelForMaskedLM), (tiny_llama_clm, AutoModelForCausalLM),
                       (tiny_bert_cls, AutoModelForSequenceClassification)):
        tok = AutoTokenizer.from_pretrained(path)
        model = auto.from_pretrained(path).eval()
        batch = tok(["To be, or not to be", "that is the question"], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits
        assert torch.isfinite(logits).all()
        assert logits.shape[-1] == (2 if auto is AutoModelForSequenceClassification else len(tok))
