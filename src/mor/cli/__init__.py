"""The ``mor`` command line: train, eval, merge, analyze, export-lora, export-vllm, generate, convert-adapter,
compare.
Thin: each command parses its flags, calls one library function, prints. ``mor <command> --help``
lists every flag.

A command is a parser and a handler registered together::

    @command("export-vllm", "write a vLLM-ready folder", arguments=add_export_vllm_flags)
    def cmd_export_vllm(args) -> int: ...

in a module listed in ``COMMAND_MODULES`` (imported when the parser is built: so a command module
imports nothing heavy at its top, and ``main`` adds the flags of the command being run only — ``mor
--help`` lists the commands without importing torch or peft).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Iterable

logger = logging.getLogger("mor")

#: Modules whose ``@command`` handlers make up ``mor`` (in the order ``mor --help`` lists them).
COMMAND_MODULES = ("mor.cli.train", "mor.cli.adapters", "mor.cli.serving", "mor.cli.compare")


@dataclass
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the command's flags
    run: Callable[[argparse.Namespace], int]  # the handler: returns the exit code
    doing: str | None = None  # what it does, for the line of a clean stop on SIGTERM / SIGINT (mor.stopping)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None], doing: str | None = None):
    """Register the decorated handler as ``mor <name>``, with the flags ``arguments`` adds. ``doing``
    ("scoring"): the command writes its outputs whole or not at all, so SIGTERM / SIGINT stop it at
    once with one line ("stopped by SIGTERM while scoring: nothing was written to ...") and exit 75."""
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(name, help, arguments, run, doing)
        return run
    return register


def _stopping(cmd: Command, args: argparse.Namespace):
    """The clean stop of ``cmd`` (see :func:`command`), or nothing."""
    import contextlib

    from ..stopping import stop_cleanly

    if cmd.doing is None:
        return contextlib.nullcontext()
    output = getattr(args, "output", None)
    return stop_cleanly(cmd.doing, f"nothing was written to {output} (what was there is as it was)" if output
                        else "no results were printed or written")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``mor`` parser: every command listed with its help, and the flags of ``commands`` (default:
    all of them; building a command's flags may import what they are generated from)."""
    from .. import __version__

    for module in COMMAND_MODULES:
        import_module(module)
    parser = argparse.ArgumentParser(prog="mor", description="Mixture-of-Ranks adapters: train, eval, merge, analyze")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"mor {__version__}")
    sub = parser.add_subparsers(dest="command")
    parser.mor_commands = sub.choices  # command name -> its parser
    for cmd in COMMANDS.values():
        command_parser = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if commands is None or cmd.name in commands:
            cmd.arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # `mor` alone runs the default job
    # the command is the first word that is not an option (mor's own options take no value)
    parser = build_parser(commands=[word for word in argv if not word.startswith("-")][:1])
    args = parser.parse_args(argv)
    if args.command is None:
        argv = ["train", *argv]
        parser = build_parser(commands=["train"])
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ..errors import MorError
    from ..safety import io_error_message
    from ..stopping import EXIT_PREEMPTED, Stopped, set_command

    try:
        if getattr(args, "config", None):  # a run file: its settings are the defaults, flags override them
            from .train import defaults_from_file

            parser.mor_commands[args.command].set_defaults(**defaults_from_file(args.config))
            args = parser.parse_args(argv)
        set_command(["mor", *argv])  # the command a clean stop names to continue
        with _stopping(COMMANDS[args.command], args):
            return COMMANDS[args.command].run(args)
    except MorError as err:  # a mistake in what the user gave: one line (and the traceback with -v)
        return _error_line(str(err), args.verbose)
    except Exception as err:  # a fault of the machine (full disk, read-only folder) is one line too
        message = io_error_message(err)
        if message is None:
            raise  # anything else is a bug: its traceback
        return _error_line(message, args.verbose)
    except Stopped as stop:  # SIGTERM / SIGINT (mor.stopping; training: mor.train.callbacks.StopOnSignal)
        print(f"\n{'error: ' if stop.status != EXIT_PREEMPTED else ''}{stop}", file=sys.stderr)  # under a progress bar
        return stop.status
    finally:
        if "torch.distributed" in sys.modules:  # a launched rank (accelerate, torchrun) leaves no gloo threads
            from ..runtime.distributed import end_process_group

            end_process_group()


def _error_line(message: str, verbose: bool) -> int:
    if verbose:
        import traceback

        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return 2


# -- flags several commands share --------------------------------------------------------------------

def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")


def add_load_in_4bit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="load the base in bitsandbytes nf4 (--no-load-in-4bit: full precision); default: the way "
                        "the adapter's training run loaded it (its training.json), else full precision")


def load_in_4bit_of(args: argparse.Namespace) -> bool:
    """``--load-in-4bit`` or the adapter's recorded setting; prints one line saying which, and a
    warning when a given flag contradicts the record (on stderr: stdout is the command's output)."""
    from ..runtime.loading import base_loading

    load_in_4bit, line, warning = base_loading(args.adapter, args.load_in_4bit)
    if args.adapter is not None:
        print(line, file=sys.stderr)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return load_in_4bit


def add_data(p: argparse.ArgumentParser, required: bool, help: str | None = None) -> None:
    p.add_argument("--data", nargs="+", required=required, default=[],
                   help=help or "tasks: JSON/JSONL/parquet/arrow/CSV files, folders of them, datasets "
                        "save_to_disk folders or hub:NAME[:CONFIG]; each is one task named after it (its test "
                        "split where it has one)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records and report how many")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output folder or an existing --output file (never an input)")


def at_least_one(value: str) -> int:
    """argparse type of counts: an int >= 1 (0 or -1 would silently score nothing or all but one)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return number

