"""Running a model only as far as the targets need: body over the batch, output layer only at
the target positions (MLM: ~15% of tokens). Used for the student, the online teacher and
evaluation alike, so all three see the same positions.
"""
from __future__ import annotations

from typing import Callable

import torch

# Models whose LM head is more than the output embedding matrix: model_type -> head attribute.
_LM_HEAD_MODULE = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head",
                   "electra": None, "distilbert": None}
# Decoder families whose logits are exactly output_embeddings(final hidden state) (no soft-capping
# or scaling), so applying the head to selected positions is exact.
_PLAIN_DECODERS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "olmo", "olmo2", "smollm3",
                   "starcoder2", "gptj", "opt"}


def body_and_head(model, task: str) -> tuple[torch.nn.Module, Callable] | None:
    """(body, head) such that head(body(...).last_hidden_state[targets]) equals the model's
    logits at the targets, or None when unknown (then the full forward is used)."""
    if task == "seq-cls":
        return None
    model_type = getattr(model.config, "model_type", None)
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None:
        return None
    if task == "mlm" and _LM_HEAD_MODULE.get(model_type):
        return body, getattr(model, _LM_HEAD_MODULE[model_type])
    if task == "clm" and model_type in _PLAIN_DECODERS and model.get_output_embeddings() is not None:
        return body, model.get_output_embeddings()
    return None


def _model_inputs(batch: dict) -> dict:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def target_hidden(model, task: str, batch: dict) -> tuple[torch.Tensor, Callable]:
    """(h, head): per-target features and the function mapping them to logits.

    For seq-cls and unknown families h already *is* the logits (head = identity): the
    classifier acts on the pooled sequence, one target per row.
    """
    split = body_and_head(model, task)
    rows, positions = batch["target_rows"], batch["target_positions"]
    if split is not None:
        body, head = split
        hidden = body(**_model_inputs(batch)).last_hidden_state
        return hidden[rows, positions], head
    logits = model(**_model_inputs(batch)).logits
    if task == "seq-cls":
        return logits[rows], _identity
    return logits[rows, positions], _identity


def _identity(x):
    return x


def target_logits(model, task: str, batch: dict) -> torch.Tensor:
    """Logits (N, V) at the targets, all at once (evaluation and the no-grad online teacher)."""
    hidden, head = target_hidden(model, task, batch)
    return head(hidden)
