"""The docstring examples (``>>>`` lines) of every petmonai module run and print what they show.

Users copy these examples, so they must run. Each module's examples run here as doctests, with
the repository root as working directory (examples name ``configs/train3d.yaml``) and the
petmonai cache (``$PETMONAI_CACHE``) in a temporary folder, so that nothing is written into the
repository. An example that needs real data, a trained run folder, training or files outside a
temporary folder is marked ``# doctest: +SKIP``; every other one is self-contained and cheap (tiny
synthetic cohorts, small tensors, files in temporary folders), so this takes seconds and needs
neither ``../shared`` data nor a GPU.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
from pathlib import Path

import pytest

import petmonai

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(petmonai.__path__, "petmonai."))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def run_doctests(module) -> tuple[doctest.TestResults, str]:
    """Run every docstring example of ``module``; return the counts and the failure report."""
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=report.write)
    return runner.summarize(verbose=False), report.getvalue()


def test_every_module_is_listed():
    assert "petmonai.data.synthetic" in MODULES and "petmonai.data.discover" in MODULES


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("petmonai-cache")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, cache_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PETMONAI_CACHE", str(cache_dir))
    results, report = run_doctests(importlib.import_module(name))
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples in {name} fail:\n{report}"
