"""What a config may make petmonai run: checked on the YAML data before anything is built.

MONAI's ``ConfigParser`` imports and calls whatever a ``_target_`` names and ``eval``-uates every
``$`` expression, so a config is code. A config from elsewhere (a colleague's run folder, a
downloaded one) is checked first, on the plain data that safe YAML reading gives (nothing is
imported from it, nothing evaluated):

- every ``_target_`` names a class or function of :data:`TRUSTED_MODULES` (MONAI's short names
  such as ``LoadImaged`` are looked up as ``ConfigParser`` looks them up), or of a module the user
  allows (``--allow-module NAME``, or the ``allow_modules:`` list of the user's own ``--config``);
- any other text that names an importable Python object (``reader: some.module.Reader``, which
  MONAI would import and call too) passes the same test;
- ``$`` expressions have one of the forms the shipped configs use (:data:`EXPRESSION_FORMS`);
- no ``%`` macro (it pulls in content from another file, unchecked), no ``_mode_: debug``.

Anything else stops with one :class:`~petmonai.errors.ConfigError` naming each entry and how to
allow it; ``--trust-config`` accepts a config as it is (for one's own run folders).

>>> check_config({"augment": [{"_target_": "RandFlipd", "keys": "image", "prob": 0.5}]}, "mine.yaml")
>>> check_config({"augment": [{"_target_": "os.remove", "path": "x"}]}, "theirs.yaml")
Traceback (most recent call last):
...
petmonai.errors.ConfigError: theirs.yaml: config not trusted, nothing was built: augment.0._target_ 'os.remove' is outside the allowed modules (os); to run it, pass --allow-module os if you trust that code, or --trust-config to accept the config as it is
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import importlib.util
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from petmonai.errors import ConfigError

# modules whose classes and functions a config may name without being allowed: what the shipped
# configs, the README's examples and the model registry use. Subpackages, not whole libraries:
# monai.bundle and monai.apps run other configs and download code, torch.load / torch.hub load it,
# and petmonai's run-folder helpers write files.
TRUSTED_MODULES = (
    "petmonai.transforms", "petmonai.models",
    "monai.transforms", "monai.networks.nets", "monai.networks.blocks", "monai.networks.layers",
    "monai.losses", "monai.inferers", "monai.data.image_reader",
    "torch.nn", "torch.optim",
)
# names that write files (SaveImaged, write_study_template, ...): never from a config from elsewhere
_WRITES_FILES = re.compile(r"^(save|write|export)", re.IGNORECASE)
# builtins that MONAI would find by a bare name (e.g. LoadImaged's ``reader``) and that touch the system
_RISKY_BUILTINS = {"open", "exec", "eval", "compile", "__import__", "breakpoint", "input", "exit", "quit", "help",
                   "setattr", "delattr", "getattr", "globals", "locals", "vars"}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_REFERENCE = r"@[A-Za-z0-9_]+(?:(?:#|::)[A-Za-z0-9_]+)*(?:\[-?\d+\])*"
_REFERENCE_EXPR = re.compile(rf"^{_REFERENCE}$")
# arithmetic of config values and numbers, e.g. the schedule's "$@train#max_epochs * @steps_per_epoch"
_OPERAND = rf"(?:{_REFERENCE}|\d+(?:\.\d+)?)"
_ARITHMETIC_EXPR = re.compile(rf"^{_OPERAND}(?:\s*(?:\*|\+|-|//|/)\s*{_OPERAND})+$")
_DTYPE_EXPR = re.compile(r"^(np|numpy|torch)\.([A-Za-z_]\w*)$")
EXPRESSION_FORMS = ("$@key, $@key[index] (a value of the config), arithmetic of such values and numbers "
                    "($@a * @b), $np.<dtype>, $torch.<dtype>")
HEADER_KEY = "allow_modules"  # a config's own list of the modules it needs
_MODES = ("default", "callable")


@dataclass(frozen=True)
class TrustPolicy:
    """What the user accepts beyond :data:`TRUSTED_MODULES`: more modules, or (``trust_config``)
    the config as it is."""

    trust_config: bool = False
    allow_modules: tuple[str, ...] = ()


_POLICY: contextvars.ContextVar[TrustPolicy] = contextvars.ContextVar("petmonai_trust_policy", default=TrustPolicy())


def current_policy() -> TrustPolicy:
    """The policy in force (:func:`trust_policy`); by default nothing beyond :data:`TRUSTED_MODULES`."""
    return _POLICY.get()


@contextlib.contextmanager
def trust_policy(trust_config: bool = False, allow_modules=()) -> Iterator[TrustPolicy]:
    """Within the block, configs are checked with this policy (the command-line options).

    >>> with trust_policy(allow_modules=["my_scanner"]):
    ...     check_config({"preprocess": [{"_target_": "my_scanner.ClipHotVoxelsd"}]}, "run/config.yaml")
    """
    modules = tuple(str(m) for m in allow_modules or ())
    for name in modules:
        if not _MODULE_NAME.match(name):
            raise ConfigError(f"--allow-module {name!r}: not a Python module name (e.g. my_scanner or my_lab.transforms)")
    token = _POLICY.set(TrustPolicy(bool(trust_config), modules))
    try:
        yield _POLICY.get()
    finally:
        _POLICY.reset(token)


def add_trust_options(parser: argparse.ArgumentParser) -> None:
    """``--trust-config`` and ``--allow-module NAME`` (repeatable) for a command that reads configs."""
    parser.add_argument("--allow-module", dest="allow_modules", action="append", default=[], metavar="NAME",
                        help="let configs name classes and functions of this Python module of yours, e.g. "
                             "my_scanner (repeatable); only modules whose code you trust")
    parser.add_argument("--trust-config", action="store_true",
                        help="accept the config (a run folder's config.yaml) as it is, without the check of what it "
                             "may run: for your own run folders only")


def policy_from_args(args) -> contextlib.AbstractContextManager:
    """:func:`trust_policy` from the options of :func:`add_trust_options`."""
    return trust_policy(bool(getattr(args, "trust_config", False)), getattr(args, "allow_modules", None) or ())


def _within(name: str, modules) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


@functools.lru_cache(maxsize=1)
def _component_locator():
    from monai.bundle.config_item import ComponentLocator

    return ComponentLocator()


def _short_name_module(name: str) -> str | None:
    """The module in which ``ConfigParser`` finds a ``_target_`` without dots (MONAI components)."""
    module = _component_locator().get_component_module_name(name)
    return module[0] if isinstance(module, list) else module


def _object_problem(name: str, allowed: tuple[str, ...]) -> tuple[str | None, str | None]:
    """Why ``name`` (a ``_target_`` or a text naming a Python object) may not be run, or None; and
    the module that ``--allow-module`` would allow it by (None where that would not help)."""
    user = tuple(m for m in allowed if not _within(m, TRUSTED_MODULES))
    if _within(name, user):
        return None, None  # the user's own module: allowed by name, not imported here
    path = name if "." in name else None
    if path is None:
        module = _short_name_module(name)
        if module is None:
            return "is not a MONAI component name", None
        path = f"{module}.{name}"
    module = path.rsplit(".", 1)[0]
    if not _within(path, TRUSTED_MODULES):
        return f"is outside the allowed modules ({module})", module
    import pydoc

    obj = pydoc.locate(path)  # imports only inside the trusted packages
    if obj is None:
        return None, None  # not found: building reports it
    home = getattr(obj, "__module__", None) or ""
    if not _within(home, TRUSTED_MODULES) or not callable(obj):
        return f"resolves to {home or '?'}.{getattr(obj, '__name__', '?')}, outside the allowed modules", None
    if _WRITES_FILES.match(getattr(obj, "__name__", "")):
        return "writes files", None
    return None, None


def _expression_problem(text: str) -> str | None:
    body = text[1:].strip()
    if _REFERENCE_EXPR.match(body) or _ARITHMETIC_EXPR.match(body):
        return None
    match = _DTYPE_EXPR.match(body)
    if match:
        import numpy as np
        import torch

        module, attr = (torch, match.group(2)) if match.group(1) == "torch" else (np, match.group(2))
        value = getattr(module, attr, None)
        if isinstance(value, torch.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
            return None
    return f"is not one of the allowed forms of $ expression ({EXPRESSION_FORMS})"


def _names_importable(text: str) -> bool:
    """Whether ``text`` reads as a dotted path into an installed module (``shutil.rmtree``)."""
    if not _DOTTED.match(text):
        return False
    top = text.split(".")[0]
    try:
        return top in sys.modules or importlib.util.find_spec(top) is not None  # finds, never runs, the module
    except (ImportError, ValueError):
        return False


def _text_problem(text: str, allowed: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(problem, module to allow) of a text value of the config."""
    if text.startswith("$"):
        return _expression_problem(text), None
    if text.startswith("%"):
        return "is a macro (content from another file, not checked)", None
    if text in _RISKY_BUILTINS:
        return "names a Python builtin that MONAI would call", None
    if _names_importable(text):
        problem, module = _object_problem(text, allowed)
        return (f"names a Python object that {problem}" if problem else None), module
    return None, None


def config_problems(cfg, allowed: tuple[str, ...] = ()) -> list[tuple[str, str, str | None]]:
    """Every entry of ``cfg`` (plain YAML data) that the check refuses: ``(where, problem, module
    that --allow-module would allow or None)``; ``where`` in ``--set`` notation (``augment.0.prob``)."""
    found: list[tuple[str, str, str | None]] = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            if "_target_" in node:
                target, at = node["_target_"], f"{where}._target_".lstrip(".")
                problem, module = (_object_problem(target, allowed) if isinstance(target, str)
                                   else ("is not the name of a class or function", None))
                if problem:
                    found.append((at, f"{target!r} {problem}", module))
            if str(node.get("_mode_", "default")) not in _MODES:
                found.append((f"{where}._mode_".lstrip("."), f"{node['_mode_']!r} is not one of {', '.join(_MODES)}",
                              None))
            for key, value in node.items():
                if key != "_target_" and not (where == "" and key == HEADER_KEY):
                    walk(value, f"{where}.{key}".lstrip("."))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}.{i}".lstrip("."))
        elif isinstance(node, str):
            problem, module = _text_problem(node, allowed)
            if problem:
                found.append((where, f"{node!r} {problem}", module))

    walk(cfg, "")
    return found


def header_modules(cfg: dict) -> tuple[str, ...]:
    """The modules a config names in its own ``allow_modules:`` list."""
    value = cfg.get(HEADER_KEY) or []
    if not isinstance(value, list) or not all(isinstance(m, str) and _MODULE_NAME.match(m) for m in value):
        raise ConfigError(f"config key '{HEADER_KEY}': a list of Python module names, got {value!r}")
    return tuple(value)


def check_config(cfg: dict, source, own: bool = False) -> None:
    """Refuse (one :class:`ConfigError` naming every entry, at most 5 shown) a config that would run
    anything outside what is allowed; ``source`` names the file in the message.

    ``own``: the user's own ``--config``, whose ``allow_modules:`` list counts as the user's word;
    a config from a run folder (``own=False``) needs ``--allow-module`` for those modules too. The
    policy is the one in force (:func:`trust_policy`).
    """
    policy = current_policy()
    if policy.trust_config:
        return
    header = header_modules(cfg)
    allowed = tuple(policy.allow_modules) + (header if own else ())
    found = config_problems(cfg, allowed)
    if not found:
        return
    entries = "; ".join(f"{where} {problem}" for where, problem, _ in found[:5])
    more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
    modules = sorted({m for _, _, m in found if m})
    hint = []
    if modules:
        flags = " ".join(f"--allow-module {m}" for m in modules)
        hint.append(f"to run it, pass {flags} if you trust that code"
                    + (f" (or list it under '{HEADER_KEY}:' in your config)" if own else ""))
    unconfirmed = [m for m in header if not own and m not in policy.allow_modules]
    if unconfirmed:
        hint.append(f"the config lists {HEADER_KEY}: {', '.join(unconfirmed)}, which only you can confirm "
                    "with --allow-module")
    hint.append("or --trust-config to accept the config as it is")
    raise ConfigError(f"{source}: config not trusted, nothing was built: {entries}{more}; {', '.join(hint)}")
