"""Chat test material: a tokenizer with chat special tokens, chat templates, conversations that stress the
alignment (leading space/newline, empty reply, tool turn, unicode, a reply repeated in the user's text)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from conftest import shakespeare_lines

# SmolLM2-135M-Instruct's template, verbatim (it came with its GGUF): ChatML, and a default system
# prompt when the conversation has none, so rendering messages one by one does not give the whole.
CHATML_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Zephyr's layout: role tags on their own line, every turn closed by the EOS token, a newline between turns.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'tool' %}\n{{ '<|tool|>\n' + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# Llama-3's layout: BOS, header tokens, the content TRIMMED, <|eot_id|> with nothing after it.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# A plain-text layout whose header ends in a space: byte-level BPE merges it with the reply's first word,
# so no token boundary exists at the reply's start (must be reported, never guessed).
MERGING = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + eos_token + '\n' }}{% endfor %}"

CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|tool|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATIONS = [
    [{"role": "user", "content": "Who art thou, good sir?"},
     {"role": "assistant", "content": " I am a humble servant of the king."},
     {"role": "user", "content": "And what is thy name?"},
     {"role": "assistant", "content": "\nMy name is Gremio, sir."}],
    [{"role": "system", "content": "Thou speakest as a player in a play."},
     {"role": "user", "content": "What weather shall we have?"},
     {"role": "assistant", "content": "Let me look at the sky."},
     {"role": "tool", "content": "{\"sky\": \"clouded\", \"wind\": \"west\"}"},
     {"role": "assistant", "content": "The sky is clouded; the wind blows from the west."}],
    [{"role": "user", "content": "Say yes, then stop."},
     {"role": "assistant", "content": "yes"},
     {"role": "user", "content": "Now say nothing at all."},
     {"role": "assistant", "content": ""},
     {"role": "user", "content": "Speak of the café — ☃ and ünïcode."},
     {"role": "assistant", "content": "The café is warm, ☃ is cold; ends with a space "}],
    [{"role": "user", "content": "Tell me a line of the play."},
     {"role": "assistant", "content": "To be, or not to be: that is the question.\n\nWhether 'tis nobler in the mind."}],
]


def train_chat_tokenizer(vocab_size: int = 600):
    """Byte-level BPE (Llama/SmolLM2-like) trained on Shakespeare and the test conversations; no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = shakespeare_lines(3000) + [m["content"] for c in CONVERSATIONS for m in c] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", *CHAT_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=CHAT_SPECIALS, model_max_length=512)


def chat_teacher(path: Path, tokenizer, template: str | None) -> Path:
    """A tiny LlamaForCausalLM over `tokenizer`, saved with `template` as its chat template (or none)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer = copy.deepcopy(tokenizer)  # the caller's stays as it was
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def many_conversations(n: int) -> list[dict]:
    """n conversations in `messages` layout, varied lengths (for multi-shard dumps)."""
    lines = shakespeare_lines(4 * n + 8)
    rows = []
    for i in range(n):
        turns = 1 + i % 3
        messages = [] if i % 4 else [{"role": "system", "content": lines[4 * i + 3]}]
        for t in range(turns):
            messages += [{"role": "user", "content": lines[(4 * i + 2 * t) % len(lines)]},
                         {"role": "assistant", "content": lines[(4 * i + 2 * t + 1) % len(lines)]}]
        rows.append({"messages": messages})
    return rows
