"""The Hugging Face Auto class for each kdcache task (the teacher is loaded, and a student built, with it)."""
from __future__ import annotations


def auto_class(task: str):
    import transformers
    return {"mlm": transformers.AutoModelForMaskedLM, "clm": transformers.AutoModelForCausalLM,
            "seq-cls": transformers.AutoModelForSequenceClassification}[task]
