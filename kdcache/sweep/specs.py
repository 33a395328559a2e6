"""The sweep's student list: `SPEC`, `NAME=SPEC`, each optionally with per-student train-student
options as `:option=value` (or `:flag`), e.g. `big=L4-H256:lr=3e-4:batch-size=16`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import KdcacheError

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Options the sweep sets itself for every student: not overridable per student either.
SWEEP_OWNED_OPTIONS = ("--cache", "--student", "--out", "--resume")
# Output-format flags of train-student that mean nothing inside a sweep.
_NOT_PER_STUDENT = ("--json", "--help")


@dataclass(frozen=True)
class Student:
    name: str   # the run folder under RUNS/
    spec: str   # what `train-student --student` gets: a preset, a config.json or a model dir
    options: tuple[tuple[str, str | None], ...] = ()  # per-student (--option, value or None for a flag)

    def option_args(self) -> list[str]:
        """The per-student options as train-student arguments."""
        args = []
        for option, value in self.options:
            args += [option] if value is None else [option, value]
        return args

    def option_text(self) -> str:
        """`lr=3e-4, batch-size=16`: how the report and the log show the overrides."""
        return ", ".join(o[2:] if v is None else f"{o[2:]}={v}" for o, v in self.options)


def default_name(spec: str) -> str:
    """Run-folder name for a student spec: the preset itself, or the file/folder it points at."""
    path = Path(spec)
    if path.name == "config.json":
        name = path.parent.name or "student"
    elif path.suffix == ".json":
        name = path.stem
    else:
        name = path.name
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def _train_student_options() -> dict:
    """train-student's click options by their long name (the single source of names and types)."""
    import click

    from ..train.command import train_student
    return {opt: param for param in train_student.params if isinstance(param, click.Option)
            for opt in param.opts if opt.startswith("--")}


def check_train_args(train_args: list[str]) -> None:
    """The options passed through to every student, parsed as train-student parses them (names,
    values, types) so a typo fails in one line before any student's folder exists."""
    import click

    from ..train.command import train_student
    # The options the sweep adds itself, as placeholders: parsing converts values, it opens nothing.
    args = [*train_args, "--cache", "CACHE", "--student", "SPEC", "--out", "OUT"]
    try:
        train_student.make_context("train-student", args, resilient_parsing=False)
    except click.exceptions.Exit:  # --help: train-student's help was printed
        raise KdcacheError("--help is not passed to the students; see `kdcache train-student --help`") from None
    except click.ClickException as e:
        raise KdcacheError(f"option for every student: {e.format_message()} (the sweep passes its other options to "
                           "`kdcache train-student`; see `kdcache train-student --help`)") from None


def parse_option(text: str, item: str, known: dict) -> tuple[str, str | None]:
    """`lr=3e-4` -> ("--lr", "3e-4"); `init-from-teacher` -> ("--init-from-teacher", None); checked
    against train-student's own options and types so a typo fails before any student trains."""
    import click

    key, sep, value = text.partition("=")
    option = "--" + key.strip().lstrip("-")
    value = value.strip() if sep else None
    example = f"e.g. {item.split(':', 1)[0]}:lr=3e-4:batch-size=16"
    if option in SWEEP_OWNED_OPTIONS or option in _NOT_PER_STUDENT:
        raise KdcacheError(f"--students entry {item!r}: {option} cannot be set per student (the sweep sets it)")
    param = known.get(option)
    if param is None:
        raise KdcacheError(f"--students entry {item!r}: {option} is not a train-student option "
                           f"(see `kdcache train-student --help`); {example}")
    if param.is_flag:
        if value is not None:
            raise KdcacheError(f"--students entry {item!r}: {option} is a flag; write :{option[2:]} without a value")
        return option, None
    if not value:
        raise KdcacheError(f"--students entry {item!r}: {option} needs a value, written :{option[2:]}=VALUE; {example}")
    try:
        param.type.convert(value, param, None)
    except click.BadParameter as e:
        raise KdcacheError(f"--students entry {item!r}: {option} {value!r}: {e.message}") from None
    return option, value


def parse_students(text: str) -> list[Student]:
    """`L2-H128,L4-H256`, with folder names `small=L2-H128,cfg=path/config.json`, and per-student
    options `L4-H256:lr=3e-4` or `big=L4-H256:lr=3e-4:batch-size=16`."""
    known = None
    students = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        head, *option_texts = item.split(":")
        name, sep, spec = head.partition("=")
        if not sep:
            name, spec = default_name(head.strip()), head
        name, spec = name.strip(), spec.strip()
        if not spec or not _NAME_OK.match(name):
            raise KdcacheError(
                f"--students entry {item!r} is not SPEC or NAME=SPEC (optionally followed by :option=value) with NAME "
                "made of letters, digits, '.', '_', '+', '-'; e.g. --students L2-H128,big=L4-H256:lr=3e-4")
        options = []
        if option_texts:
            known = known or _train_student_options()
            for option_text in option_texts:
                option, value = parse_option(option_text, item, known)
                if option in (o for o, _ in options):
                    raise KdcacheError(f"--students entry {item!r} sets {option} twice; keep one")
                options.append((option, value))
        students.append(Student(name, spec, tuple(options)))
    if not students:
        raise KdcacheError("--students is empty; give a comma-separated list such as L2-H128,L4-H256")
    seen = {}
    for s in students:
        if s.name in seen:
            raise KdcacheError(
                f"--students names two runs {s.name!r} ({seen[s.name]} and {s.spec}); name them apart with NAME=SPEC")
        seen[s.name] = s.spec
    return students
