"""Loading the teacher (directory, hub id or .gguf file), detecting its task, fingerprinting it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.files import files_sha256, json_sha256
from ..errors import KdcacheError
from ..models import auto_class

# Head class name suffix -> task. The suffix is what transformers' Auto classes key on.
HEAD_SUFFIXES = (("ForMaskedLM", "mlm"), ("ForCausalLM", "clm"), ("ForSequenceClassification", "seq-cls"))
# Models whose learned position table reserves pad_token_id + 1 leading slots.
PADDING_OFFSET_MODEL_TYPES = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "data2vec-text"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass
class Teacher:
    model: object
    tokenizer: object
    task: str
    source: str
    gguf_file: str | None
    config: object
    vocab_size: int            # input id space (teacher embedding size)
    target_vocab_size: int     # output size: vocab (LM) or num_labels (seq-cls)
    max_positions: int | None  # longest sequence the teacher accepts
    fingerprint: dict = field(default_factory=dict)
    tokenizer_sha256: str = ""
    load_source: str = ""
    load_kwargs: dict = field(default_factory=dict)


def resolve_source(teacher: str) -> tuple[str, str | None, Path | None]:
    """(source for from_pretrained, gguf file name or None, local folder or None)."""
    path = Path(teacher).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent.resolve()), path.name, path.parent.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path.resolve()), ggufs[0].name, path.resolve()
            raise KdcacheError(
                f"teacher directory {path} has no config.json; pass a transformers model directory "
                "(save_pretrained output), a .gguf file or a hub id")
        return str(path.resolve()), None, path.resolve()
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    looks_local = teacher.startswith((".", "/", "~")) or teacher.count("/") > 1 or teacher.endswith(".gguf")
    if looks_local:
        raise KdcacheError(
            f"teacher {teacher!r} not found: no such directory or .gguf file; pass a model directory, a .gguf file or a hub id")
    return teacher, None, None  # a hub id


def detect_task(config, forced: str | None, gguf_file: str | None) -> str:
    if forced:
        return forced
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in HEAD_SUFFIXES:
            if arch.endswith(suffix):
                return task
    if gguf_file:  # GGUF files hold decoder LMs
        return "clm"
    raise KdcacheError(
        f"cannot tell the teacher's task from its config (architectures={getattr(config, 'architectures', None)}); "
        "pass --task mlm, --task clm or --task seq-cls")


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", None) in PADDING_OFFSET_MODEL_TYPES:
                value -= (getattr(config, "pad_token_id", 1) or 1) + 1
            return value
    return None


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides token ids: the vocabulary (with added tokens) and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {name: getattr(tokenizer, name, None) for name in
                ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")}
    return json_sha256({"vocab": vocab, "special": specials, "class": type(tokenizer).__name__})


def config_fingerprint(folder: Path | None, config) -> str:
    if folder is not None and (folder / "config.json").is_file():
        return json_sha256(json.loads((folder / "config.json").read_text()))
    data = config.to_dict()
    data.pop("transformers_version", None)
    data.pop("_name_or_path", None)
    return json_sha256(data)


def weights_fingerprint(folder: Path | None, gguf_file: str | None) -> str | None:
    """sha256 over the weight files' own sha256s (name-sorted): once per run, even for big models."""
    if folder is None:
        return None
    files = [folder / gguf_file] if gguf_file else sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    return files_sha256(files)


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or find cached) a hub model, so its files can be fingerprinted like a local folder."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.gguf"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is a user-facing "cannot get this teacher"
        raise KdcacheError(
            f"teacher {repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}); check the id or pass a local model directory") from None


def load_teacher(teacher: str, *, task: str | None = None, dtype=None, device="cpu",
                 trust_remote_code: bool = False, load_weights: bool = True) -> Teacher:
    """Load tokenizer + config (+ model unless load_weights is False, e.g. for --dry-run)."""
    import transformers

    source, gguf_file, folder = resolve_source(teacher)
    if folder is None:
        folder = _hub_snapshot(source)
        source_for_load = str(folder)
    else:
        source_for_load = source
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        config = transformers.AutoConfig.from_pretrained(source_for_load, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source_for_load, **kwargs)
    except KdcacheError:
        raise
    except Exception as e:  # noqa: BLE001
        raise KdcacheError(f"cannot load teacher {teacher!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                           "; pass a transformers model directory with its tokenizer") from None
    task = detect_task(config, task, gguf_file)
    vocab_size = max(int(getattr(config, "vocab_size", None) or len(tokenizer)), len(tokenizer))
    target_vocab = int(config.num_labels) if task == "seq-cls" else vocab_size
    fingerprint = {
        "source": source if folder is None or not Path(source).exists() else str(Path(source).resolve()),
        "gguf_file": gguf_file,
        "model_type": getattr(config, "model_type", None),
        "architecture": (getattr(config, "architectures", None) or [None])[0],
        "config_sha256": config_fingerprint(folder, config),
        "weights_sha256": weights_fingerprint(folder, gguf_file),
        "num_parameters": None,
    }
    if gguf_file and Path(teacher).expanduser().is_file():
        fingerprint["source"] = str(Path(teacher).expanduser().resolve())  # the .gguf file itself
    elif source != teacher and not Path(teacher).exists():
        fingerprint["source"] = teacher  # hub id, not the snapshot folder
    teacher = Teacher(model=None, tokenizer=tokenizer, task=task, source=fingerprint["source"], gguf_file=gguf_file,
                   config=config, vocab_size=vocab_size, target_vocab_size=target_vocab,
                   max_positions=max_positions(config), fingerprint=fingerprint,
                   tokenizer_sha256=tokenizer_fingerprint(tokenizer))
    teacher.load_source, teacher.load_kwargs = source_for_load, kwargs
    if load_weights:
        load_model(teacher, dtype=dtype, device=device)
    return teacher


def config_json(teacher: Teacher) -> bytes:
    """The teacher's config.json as stage two should see it: the file itself for a model folder,
    the config transformers derives for a GGUF teacher (which has no config.json)."""
    folder = Path(teacher.load_source)
    if not teacher.gguf_file and (folder / "config.json").is_file():
        return (folder / "config.json").read_bytes()
    return teacher.config.to_json_string(use_diff=False).encode()


def load_model(teacher: Teacher, *, dtype=None, device="cpu") -> None:
    """Load the weights (the slow part), after every cheap check on config, tokenizer and corpus."""
    try:
        model = auto_class(teacher.task).from_pretrained(teacher.load_source, dtype=dtype, **teacher.load_kwargs)
    except Exception as e:  # noqa: BLE001
        raise KdcacheError(f"cannot load teacher {teacher.source!r} as a {teacher.task} model: {type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0]}; check --task") from None
    teacher.model = model.eval().to(device)
    teacher.fingerprint["num_parameters"] = sum(p.numel() for p in model.parameters())
    teacher.fingerprint["architecture"] = teacher.fingerprint["architecture"] or type(model).__name__  # GGUF configs lack it
    if teacher.task != "seq-cls":
        # Some checkpoints pad the output layer beyond the tokenizer (e.g. to a multiple of 64).
        out_size = int(model.get_output_embeddings().weight.shape[0])
        teacher.target_vocab_size = max(teacher.target_vocab_size, out_size)
        teacher.vocab_size = max(teacher.vocab_size, out_size)
