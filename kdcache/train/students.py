"""Which student to train: a size preset in the teacher's own architecture family, a
config.json, or a model directory; vocabulary and special tokens always from the cache.

Presets are the BERT-miniatures grid (Turc et al., 2019): L{2,4,6,8,10,12} x H{128,256,512,768},
with H/64 attention heads and a 4H feed-forward layer, applied to whatever the teacher is
(BERT -> BERT, Llama -> Llama, ...).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.manifest import CacheManifest, view
from ..errors import KdcacheError
from ..models import auto_class

PRESET_LAYERS = (2, 4, 6, 8, 10, 12)
PRESET_HIDDEN = (128, 256, 512, 768)
PRESETS = tuple(f"L{l}-H{h}" for l in PRESET_LAYERS for h in PRESET_HIDDEN)
_PRESET_RE = re.compile(r"^L(\d+)-H(\d+)$", re.IGNORECASE)
# The index of a transformer block inside a parameter name: bert "encoder.layer.3.",
# llama "layers.3.", gpt2 "h.3.".
_LAYER_RE = re.compile(r"\.(layer|layers|h|block|blocks)\.(\d+)\.")
_INTERMEDIATE_ATTRS = ("intermediate_size", "n_inner", "ffn_dim")


@dataclass
class Sizes:
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    intermediate: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.layers, self.hidden, self.heads, self.intermediate))


@dataclass
class StudentPlan:
    """What build_student will create: a config (fresh weights) or a model dir (its weights)."""
    spec: str
    kind: str                    # "preset" | "config" | "model"
    config: object               # transformers.PretrainedConfig
    model_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def split_gguf(path: str | Path, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name) for from_pretrained: a path to a .gguf file becomes its
    folder plus the file name (transformers' gguf_file= convention)."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return str(p.parent), p.name
    return str(path), gguf_file


def load_pretrained(cls, path: str | Path, **kwargs):
    """cls.from_pretrained for a model directory, hub id or .gguf file."""
    source, gguf = split_gguf(path)
    return cls.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}), **kwargs)


def teacher_source(manifest: CacheManifest | dict, override: str | Path | None) -> tuple[str | None, str | None]:
    """(folder or hub id, gguf file) of the teacher: --teacher wins over the manifest (whose
    GGUF source is the .gguf file itself)."""
    if override is not None:
        return split_gguf(override)
    teacher = view(manifest).teacher
    source = teacher.get("source")
    return split_gguf(source, teacher.get("gguf_file")) if source else (None, None)


def stored_teacher_config(manifest: CacheManifest | dict, cache_dir: Path):
    """The teacher's config saved inside the cache at dump time; None for caches made before."""
    from transformers import AutoConfig

    from ..cache.manifest import resolve_inside
    from ..cache.storage import local_file

    stored = view(manifest).teacher_config
    if not stored:
        return None
    try:
        # From a bucket: copied to local disk first (transformers reads files).
        return AutoConfig.from_pretrained(local_file(resolve_inside(cache_dir, stored, "teacher_config")))
    except Exception as e:  # noqa: BLE001 - missing or unreadable: the cache is damaged
        raise KdcacheError(f"cache {cache_dir}: the teacher config it lists ({stored}) is missing or unreadable "
                           f"({type(e).__name__}); restore it from the teacher's config.json or re-create the cache "
                           "with `kdcache dump-logits`") from None


def teacher_config(manifest: CacheManifest | dict, override=None, cache_dir: Path | None = None):
    """The teacher's config: --teacher if given, else the copy inside the cache (so the same cache
    gives the same student anywhere), else the teacher's directory if reachable (caches made
    before the copy existed), else a default config of its family."""
    from transformers import AutoConfig

    if override is None and cache_dir is not None:
        stored = stored_teacher_config(manifest, cache_dir)
        if stored is not None:
            return stored
    source, gguf = teacher_source(manifest, override)
    if source is not None:
        try:
            return AutoConfig.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
        except Exception:
            if override is not None:
                raise KdcacheError(f"--teacher {override} is not a loadable model (no usable config.json); "
                                   "pass the teacher's save_pretrained directory") from None
    model_type = view(manifest).teacher.get("model_type")
    if not model_type:
        raise KdcacheError("cannot tell the teacher's architecture from the cache manifest; "
                           "pass --teacher DIR, or --student path/to/config.json")
    try:
        return AutoConfig.for_model(model_type)
    except ValueError:
        raise KdcacheError(f"teacher architecture {model_type!r} (from the manifest) is unknown to this transformers; "
                           "pass --student path/to/config.json") from None


def apply_sizes(config, sizes: Sizes) -> None:
    """Set depth/width on any transformers config (attribute_map handles GPT-2's n_embd etc.)."""
    if sizes.layers is not None:
        config.num_hidden_layers = sizes.layers
    if sizes.hidden is not None:
        config.hidden_size = sizes.hidden
    if sizes.heads is not None:
        config.num_attention_heads = sizes.heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = sizes.heads
    if sizes.intermediate is not None:
        for attr in _INTERMEDIATE_ATTRS:
            if hasattr(config, attr):
                setattr(config, attr, sizes.intermediate)
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = config.hidden_size // config.num_attention_heads


def _check_shape(config, spec: str) -> None:
    hidden, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    if min(hidden, heads, layers) < 1 or hidden % heads:
        raise KdcacheError(f"student {spec}: hidden size {hidden} must be a positive multiple of the number of "
                           f"attention heads {heads} (and layers {layers} >= 1); adjust --hidden/--heads/--layers")


def _cache_vocab_check(manifest: CacheManifest, vocab_size: int | None, where: str) -> None:
    if vocab_size is not None and int(vocab_size) != manifest.vocab_size:
        raise KdcacheError(f"{where} has a vocabulary of {vocab_size} tokens but the cache's tokenizer has "
                           f"{manifest.vocab_size}; a student must share the cache's vocabulary (use a preset, "
                           "or a config/model built for this tokenizer)")


def _tokenizer_vocab_check(model_dir: Path, cache_tokenizer_dir: Path) -> None:
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer
    try:
        mine = AutoTokenizer.from_pretrained(model_dir).get_vocab()
        theirs = AutoTokenizer.from_pretrained(cache_tokenizer_dir).get_vocab()
    except Exception:
        return  # an unreadable tokenizer is not ours to judge; the size check already ran
    if mine != theirs:
        raise KdcacheError(f"the tokenizer in {model_dir} differs from the cache's ({cache_tokenizer_dir}); "
                           "a student must share the cache's vocabulary")


def plan_student(spec: str, manifest: CacheManifest | dict, *, cache_tokenizer_dir: Path, sizes: Sizes | None = None,
                 teacher=None, cache_dir: Path | None = None) -> StudentPlan:
    """Resolve --student SPEC (+ size overrides) against the cache."""
    from transformers import AutoConfig

    manifest = view(manifest)
    sizes = sizes or Sizes()
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        if sizes.any():
            raise KdcacheError(f"--layers/--hidden/--heads/--intermediate cannot resize the trained model in {spec}; "
                               "use a preset or a config.json to get a fresh student of another size")
        config = AutoConfig.from_pretrained(path)
        _cache_vocab_check(manifest, getattr(config, "vocab_size", None), f"model {spec}")
        _tokenizer_vocab_check(path, cache_tokenizer_dir)
        plan = StudentPlan(spec, "model", config, model_dir=path)
    elif path.suffix == ".json" and path.is_file():
        try:
            values = json.loads(path.read_text())
            model_type = values.pop("model_type")
        except (ValueError, KeyError, AttributeError):
            raise KdcacheError(f"--student {spec} is not a transformers config.json (needs a model_type key)") from None
        _cache_vocab_check(manifest, values.get("vocab_size"), f"config {spec}")
        try:
            config = AutoConfig.for_model(model_type, **values)
        except ValueError:
            raise KdcacheError(f"--student {spec}: model_type {model_type!r} is unknown to this transformers") from None
        apply_sizes(config, sizes)
        plan = StudentPlan(spec, "config", config)
    elif (match := _PRESET_RE.match(spec)) and spec.upper() in PRESETS:
        layers, hidden = int(match.group(1)), int(match.group(2))
        config = teacher_config(manifest, teacher, cache_dir)
        base = Sizes(layers, hidden, max(1, hidden // 64), 4 * hidden)
        # Overrides win; a --hidden override re-derives the heads/width the preset would give.
        if sizes.hidden is not None:
            base = Sizes(layers, sizes.hidden, max(1, sizes.hidden // 64), 4 * sizes.hidden)
        apply_sizes(config, base)
        apply_sizes(config, sizes)
        plan = StudentPlan(spec.upper(), "preset", config)
    else:
        raise KdcacheError(f"--student {spec!r} is neither a preset, a config.json nor a model directory; presets: "
                           f"L{{{','.join(map(str, PRESET_LAYERS))}}}-H{{{','.join(map(str, PRESET_HIDDEN))}}}, e.g. L4-H256")
    if plan.kind != "model":
        _fit_to_cache(plan.config, manifest)
    _check_shape(plan.config, plan.spec)
    return plan


def _fit_to_cache(config, manifest: CacheManifest) -> None:
    """Vocabulary, special tokens, labels and length from the cache, never from the teacher."""
    config.vocab_size = manifest.vocab_size
    special = manifest.special_token_ids
    for name in ("pad", "bos", "eos", "sep", "cls"):
        attr = f"{name}_token_id"
        if special.get(name) is not None and (hasattr(config, attr) or name == "pad"):
            setattr(config, attr, int(special[name]))
    if manifest.task == "seq-cls":
        id2label = dict(manifest.id2label)
        num_labels = manifest.num_labels or manifest.target_vocab_size
        config.num_labels = num_labels
        config.id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
        config.label2id = {l: i for i, l in config.id2label.items()}
    max_length = manifest.max_length
    if getattr(config, "max_position_embeddings", None) is not None and config.max_position_embeddings < max_length:
        config.max_position_embeddings = max_length
    for attr in ("architectures", "_name_or_path"):
        if hasattr(config, attr):
            setattr(config, attr, None if attr == "architectures" else "")


def build_student(plan: StudentPlan, task: str):
    """The student model (fp32): fresh weights from the config, or the model dir's weights."""
    import torch

    cls = auto_class(task)
    if plan.model_dir is not None:
        try:
            return cls.from_pretrained(plan.model_dir, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise KdcacheError(f"cannot load a {task} model from {plan.model_dir} ({str(e).splitlines()[0]}); "
                               "point --student at a save_pretrained directory of that task") from None
    return cls.from_config(plan.config, dtype=torch.float32)


def teacher_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Evenly spaced teacher layers for each student layer, first and last included."""
    if student_layers == 1:
        return [0]
    return [int(i) for i in np.linspace(0, teacher_layers - 1, student_layers).round()]


def init_from_teacher(student, task: str, manifest: CacheManifest | dict, teacher=None) -> list[int]:
    """DistilBERT's initialisation: copy embeddings, heads and evenly spaced teacher layers.
    Returns the teacher layer copied into each student layer."""
    import torch

    source, gguf = teacher_source(manifest, teacher)
    if source is None:
        raise KdcacheError("--init-from-teacher needs the teacher's weights: the cache names no teacher; pass --teacher DIR")
    s_cfg = student.config
    t_cfg = teacher_config(manifest, teacher)
    if s_cfg.hidden_size != t_cfg.hidden_size:
        raise KdcacheError(f"--init-from-teacher copies teacher layers, so the student's hidden size must equal the "
                           f"teacher's: student {s_cfg.hidden_size}, teacher {t_cfg.hidden_size}; use --hidden "
                           f"{t_cfg.hidden_size} (or a preset of that width) or drop --init-from-teacher")
    if s_cfg.num_hidden_layers > t_cfg.num_hidden_layers:
        raise KdcacheError(f"--init-from-teacher: the student has {s_cfg.num_hidden_layers} layers but the teacher only "
                           f"{t_cfg.num_hidden_layers}; use --layers {t_cfg.num_hidden_layers} or fewer")
    try:
        teacher_model = auto_class(task).from_pretrained(source, dtype=torch.float32,
                                                         **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as e:
        raise KdcacheError(f"--init-from-teacher: cannot load the teacher from {source} ({str(e).splitlines()[0]}); "
                           "pass --teacher DIR") from None
    layer_map = teacher_layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    t_state = teacher_model.state_dict()
    new_state = {}
    for name, param in student.state_dict().items():
        t_name = _LAYER_RE.sub(lambda m: f".{m.group(1)}.{layer_map[int(m.group(2))]}.", name, count=1)
        if t_name not in t_state:
            continue
        if t_state[t_name].shape != param.shape:
            raise KdcacheError(f"--init-from-teacher: student parameter {name} has shape {tuple(param.shape)}, the "
                               f"teacher's {tuple(t_state[t_name].shape)}; give the student the teacher's sizes "
                               f"(--heads {t_cfg.num_attention_heads} --intermediate "
                               f"{next((getattr(t_cfg, a) for a in _INTERMEDIATE_ATTRS if getattr(t_cfg, a, None)), '?')})")
        new_state[name] = t_state[t_name]
    student.load_state_dict(new_state, strict=False)
    return layer_map
