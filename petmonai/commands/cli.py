"""The ``petmonai`` command line: ``petmonai <command> [options]`` (``petmonai --help`` lists them).

Installed as the console script ``petmonai`` (and ``python -m petmonai.commands``); ``scripts/*.py``
and the older console scripts ``petmonai-train3d`` / ``petmonai-audit`` are the same commands under
their earlier names (:func:`command_main`). A user error (:class:`petmonai.errors.PetmonaiError`)
ends a command with one line on stderr and exit status 2, never a traceback.

A new command: a module with an options function and a ``@command``-decorated runner
(:mod:`petmonai.commands.registry`), listed in :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from petmonai.commands.registry import COMMANDS, build_parser, user_errors
from petmonai.trust import policy_from_args

# the modules whose @command functions make up `petmonai`; listed in `petmonai --help` in this order
COMMAND_MODULES = (
    "petmonai.commands.run_commands",
    "petmonai.commands.data_commands",
    "petmonai.commands.study_commands",
    "petmonai.commands.bundle",
    "petmonai.commands.convert",
)


def load_commands() -> dict:
    for name in COMMAND_MODULES:
        importlib.import_module(name)
    return COMMANDS


def _run(name: str, args: argparse.Namespace, prog: str, argv: list[str]) -> int:
    args.invocation = " ".join([prog, *argv])  # the command line as typed, for reports that quote it
    with policy_from_args(args):  # --trust-config / --allow-module: what configs may run (petmonai.trust)
        status = COMMANDS[name].run(args)
    return 0 if status is None else int(status)


def main_parser() -> argparse.ArgumentParser:
    import petmonai

    parser = argparse.ArgumentParser(prog="petmonai", description="3D deep learning on brain FDG-PET (NC vs MCI) "
                                     "with MONAI: audit the data, train and cross-validate, predict, report.")
    parser.add_argument("--version", action="version", version=f"petmonai {petmonai.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for cmd in load_commands().values():
        build_parser(cmd, parser=sub.add_parser(cmd.name, help=cmd.help))
    return parser


@user_errors
def main(argv=None) -> int:
    """``petmonai <command> [options]``."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = main_parser().parse_args(argv)
    return _run(args.command, args, "petmonai", argv)


def command_main(name: str, prog: str):
    """``main(argv=None)`` of one command under another name (a script, an older console script)."""

    @user_errors
    def main(argv=None) -> int:
        argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
        args = build_parser(load_commands()[name], prog=prog).parse_args(argv)
        return _run(name, args, prog, argv)

    main.command = name
    main.__name__ = main.__qualname__ = f"{name.replace('-', '_')}_main"
    main.__doc__ = f"``{prog}``: the same as ``petmonai {name}``."
    return main


# the earlier entry points, unchanged for their users (scripts/*.py, tests, the petmonai-* console scripts)
train3d_main = command_main("train", "train3d.py")
audit_main = command_main("audit", "audit.py")
export_main = command_main("export-preprocessed", "export_preprocessed.py")
build_template_main = command_main("build-template", "build_template.py")
anchor_main = command_main("anchor-folds", "anchor_folds.py")
compare_main = command_main("compare", "compare_2d_3d.py")
export_bundle_main = command_main("export-bundle", "export_bundle.py")
convert_dicom_main = command_main("convert-dicom", "petmonai convert-dicom")
to_bids_main = command_main("to-bids", "petmonai to-bids")
predict_main = command_main("predict", "predict.py")
report_main = command_main("report", "report.py")
experiments_main = command_main("experiments", "experiments.py")
bench_main = command_main("bench", "bench.py")
bench_predict_main = command_main("bench-predict", "bench_predict.py")
show_pipeline_main = command_main("show-pipeline", "show_pipeline.py")
