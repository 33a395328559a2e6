"""`kdcache` command line: a thin group; each command lives next to the code it drives.

Commands are imported lazily so `kdcache --help` is quick and torch loads only when needed.
"""
from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading

import click

from . import __version__
from .errors import KdcacheError

COMMANDS = {
    "dump-logits": ("kdcache.dump.command", "dump_logits"),
    "inspect": ("kdcache.cache.commands", "inspect_cmd"),
    "verify": ("kdcache.cache.commands", "verify_cmd"),
    "train-student": ("kdcache.train.command", "train_student"),
    "evaluate": ("kdcache.train.evaluate_command", "evaluate_cmd"),
    "sweep": ("kdcache.sweep.command", "sweep_cmd"),
    "report": ("kdcache.sweep.report_command", "report_cmd"),
}

SHORT_HELP = {
    "dump-logits": "Stage one: run a teacher once, write top-k soft targets to a Parquet cache.",
    "inspect": "Summarise a cache: task, teacher, rows, size, top-k mass, teacher accuracy.",
    "verify": "Check every shard of a cache: checksum, rows, schema, id range, log-probs.",
    "train-student": "Stage two: train a student of any size by streaming a cache.",
    "evaluate": "Compare a trained student with the teacher on a held-out cache.",
    "sweep": "Train several students from one cache, each into its own folder (resumable).",
    "report": "Evaluate a sweep's students and write report.md and report.png.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        # Short help without importing every command module (and torch).
        with formatter.section("Commands"):
            formatter.write_dl([(name, SHORT_HELP[name]) for name in COMMANDS])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdcache")
def cli():
    """kdcache: pay the teacher once, distil many students.

    \b
    Stage one   kdcache dump-logits --teacher T --data D --out CACHE
    Stage two   kdcache train-student --cache CACHE --student L4-H256 --out STUDENT
    """


def _close_progress_bars() -> None:
    """A progress bar the error interrupted would otherwise share its line with the message."""
    std = sys.modules.get("tqdm.std")
    if std is not None:
        for bar in list(getattr(std.tqdm, "_instances", ())):
            bar.close()


def main(argv=None):
    """Run one command. As the `kdcache` program (no argv: the console script, `python -m kdcache`,
    torchrun) the process then ends through `_exit`; called with argv (tests, scripts) it returns
    or raises SystemExit like any click program."""
    if argv is not None:
        return _run(argv)
    try:
        code = _run(None)  # click returns an Exit's status (--help, --version) instead of raising it
        code = code if isinstance(code, int) else 0
    except SystemExit as e:
        code = e.code
    except BaseException:  # a bug: its traceback, then the same hard exit
        import traceback
        _close_progress_bars()  # as for a KdcacheError: the traceback starts on its own line
        traceback.print_exc()
        code = 1
    _exit(code)


def _run(argv):
    try:
        return cli.main(args=argv, prog_name="kdcache", standalone_mode=False)
    except KdcacheError as e:
        _close_progress_bars()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


def _exit(code) -> None:
    """End the process with the command's status, skipping the interpreter's teardown.

    pyarrow's worker threads can still be dropping their last references to Python objects (the
    buffer of a shard just read) after the call that used them returned. If one does so while the
    interpreter is being finalised, CPython ends that thread inside a C++ destructor and the process
    aborts ("terminate called without an active exception", exit 134, apache/arrow#34314) after the
    command printed its result: `verify` did, one run in four. So everything Python's exit would do
    is done here while the interpreter is whole, in its order (non-daemon threads joined, with
    concurrent.futures' pools: a read-ahead still fetching from a bucket must end before pyarrow's
    atexit finalises S3; then atexit handlers: child processes, logging, torch, S3; then the
    streams are flushed) and the process ends with os._exit, which stops no thread halfway through
    Python code.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    try:
        threading._shutdown()  # what Py_FinalizeEx runs before the atexit handlers
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe must not change the status
                pass
        os._exit(code)


if __name__ == "__main__":
    main()
