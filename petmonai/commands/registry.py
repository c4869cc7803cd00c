"""The registry of ``petmonai`` subcommands and how a user error ends one.

A command is a name, a one-line help, a function that adds its options to an argparse parser and a
function that turns the parsed options into plain values and calls the workflow behind it
(:mod:`petmonai.commands.workflows` and friends), so the logic never sees an argparse Namespace.
Adding one takes a few lines in a module of :data:`petmonai.commands.cli.COMMAND_MODULES`:

    def hello_options(parser):
        parser.add_argument("--name", default="world")

    @command("hello", "Say hello.", hello_options)
    def hello(args):
        print(f"hello {args.name}")
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

from petmonai.errors import PetmonaiError
from petmonai.trust import add_trust_options


@dataclass(frozen=True)
class Command:
    name: str                                            # petmonai <name>
    help: str                                            # one line, in ``petmonai --help``
    add_options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]      # None counts as exit status 0
    description: str | None = None                       # ``petmonai <name> --help`` (default: help)
    reads_configs: bool = True                           # --trust-config / --allow-module (petmonai.trust)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_options: Callable[[argparse.ArgumentParser], None],
            description: str | None = None, reads_configs: bool = True):
    """Register the decorated ``run(args)`` as ``petmonai <name>``."""

    def register(run):
        if name in COMMANDS:
            raise ValueError(f"command '{name}' is registered twice")
        COMMANDS[name] = Command(name, help, add_options, run, description, reads_configs)
        return run

    return register


def build_parser(cmd: Command, prog: str | None = None, parser: argparse.ArgumentParser | None = None):
    """The parser of one command: standalone (``prog``, a script's name) or a subparser."""
    parser = parser or argparse.ArgumentParser(prog=prog)
    parser.description = cmd.description or cmd.help
    cmd.add_options(parser)
    if cmd.reads_configs:  # every command that builds a config checks it first (petmonai.trust)
        add_trust_options(parser)
    return parser


def user_errors(main):
    """Run ``main``; print a user error as one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except PetmonaiError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
