"""The options every command spells the same way, defined once.

``--config`` and ``--set KEY.PATH=VALUE`` (config overrides, repeatable), ``--data-root``,
``--output-dir`` / ``--output`` with ``--overwrite``, ``--device``, ``--skip-bad``, ``--seed``.
A command adds the groups it takes; only its help texts and defaults differ.
"""

from __future__ import annotations

from pathlib import Path

DATA_ROOT_HELP = ("competition-layout folder (Train/<class>/, Test/), CSV datalist (image,label[,subject,site]) "
                  "or BIDS dataset")


def add_config(parser, default=None, help="YAML config: a file or a shipped name such as train3d or "
               "experiments/mask (default: train3d)") -> None:
    """``--config`` and ``--set`` (into ``args.overrides``)."""
    parser.add_argument("--config", type=Path, default=default, help=help)
    add_set(parser)


def add_set(parser, flag: str = "--set", dest: str = "overrides", metavar: str = "KEY.PATH=VALUE",
            help="override any config entry, e.g. --set train.lr=1e-3 (repeatable)") -> None:
    parser.add_argument(flag, dest=dest, action="append", default=[], metavar=metavar, help=help)


def add_data_root(parser, required: bool = False, help: str = DATA_ROOT_HELP) -> None:
    parser.add_argument("--data-root", required=required, default=None, help=help)


def add_output_dir(parser, required: bool = False, help: str = "output folder", overwrite: str | None = None) -> None:
    """``--output-dir`` (and ``--overwrite`` when ``overwrite`` gives its help)."""
    parser.add_argument("--output-dir", type=Path, required=required, default=None, help=help)
    if overwrite:
        add_overwrite(parser, overwrite)


def add_output(parser, required: bool = False, default=None, help: str = "output file",
               overwrite: str | None = None) -> None:
    """``--output`` (a file) (and ``--overwrite`` when ``overwrite`` gives its help)."""
    parser.add_argument("--output", type=Path, required=required, default=default, help=help)
    if overwrite:
        add_overwrite(parser, overwrite)


def add_overwrite(parser, help: str = "replace existing outputs") -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def add_device(parser, default=None, help: str = "auto | cpu | cuda") -> None:
    parser.add_argument("--device", default=default, help=help)


def add_skip_bad(parser, help: str = "leave out files that cannot be used, listing them, instead of stopping") -> None:
    parser.add_argument("--skip-bad", action="store_true", help=help)


def add_seed(parser, help: str = "random seed (default: the config's)") -> None:
    parser.add_argument("--seed", type=int, default=None, help=help)


def add_inputs(parser, flag: str = "--input", required: bool = True,
               help: str = "folder(s) of <uuid>.nii[.gz] files, a BIDS dataset and/or single files") -> None:
    parser.add_argument(flag, nargs="+", required=required, metavar="DIR_OR_FILE", help=help)


def comma_list(text: str | None, kind=str) -> list | None:
    """``"0,2"`` -> ``[0, 2]`` (None stays None)."""
    if text is None:
        return None
    return [kind(part.strip()) for part in text.split(",") if part.strip()]

