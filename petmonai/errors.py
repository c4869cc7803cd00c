"""User-facing errors: raised for bad input, caught by the command-line entry points."""

from __future__ import annotations


class PetmonaiError(Exception):
    """A problem the user can fix (bad path, bad file, bad option); printed without a traceback."""


class DataError(PetmonaiError):
    """A data file that cannot be used. ``str(err)`` names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(PetmonaiError):
    """A configuration entry that is unknown or has the wrong type; names the key."""
