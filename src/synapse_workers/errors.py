"""The one error type users see (a bad environment or a refused configuration: exit code 2), and a problem as data.

A `Problem` is the sentence a person reads (it *is* a `str`: every list of messages stays a list of strings)
carrying what a program needs: its subject (an environment `Variable` of the registry, a `YamlPath` in the
user's homeserver.yaml, a `File`, or a command-line `Argument`), what was expected, what was found, and the
other variables a cross-variable check involved. Synapse's `ConfigError(msg, path)` is the model. `check --json`
prints these fields; the CLI prints the sentence. Warnings are the same type, said and not refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variable:
    """An environment variable: a name of `settings.VARIABLES`, refused when made otherwise (a typo in a name is
    an error where the problem is built, and tests/unit/test_problems.py finds every literal one)."""

    name: str

    def __post_init__(self) -> None:
        from .settings import VARIABLES  # settings imports this module: late, once settings exists

        if self.name not in VARIABLES:
            raise ValueError(f"{self.name!r} is not a variable synapse-workers reads (settings.VARIABLES)")

    def __str__(self) -> str:
        return self.name

    def as_json(self) -> dict[str, Any]:
        return {"variable": self.name}


@dataclass(frozen=True)
class YamlPath:
    """A value of a YAML file the user owns (homeserver.yaml): the file and the concrete path in it
    (`listeners[0].resources`, as homeserver_keys.py names them)."""

    file: str
    path: str

    def __str__(self) -> str:
        return f"{self.file} at {self.path!r}"

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "path": self.path}


@dataclass(frozen=True)
class File:
    """A file or directory on disk (not a key inside it)."""

    path: str

    def __str__(self) -> str:
        return self.path

    def as_json(self) -> dict[str, Any]:
        return {"file": self.path}


@dataclass(frozen=True)
class Argument:
    """A command-line argument (the official image's arguments, official_args.py)."""

    text: str

    def __str__(self) -> str:
        return self.text

    def as_json(self) -> dict[str, Any]:
        return {"argument": self.text}


Subject = Variable | YamlPath | File | Argument


class Problem(str):
    """One problem (or warning): its sentence, plus the data. Compares and prints as the sentence."""

    subject: Subject | None
    expected: str | None
    found: str | None
    related: tuple[Variable, ...]

    def __new__(
        cls,
        message: str,
        subject: Subject | None = None,
        *,
        expected: str | None = None,
        found: str | None = None,
        related: Iterable[Variable] = (),
    ) -> Problem:
        self = super().__new__(cls, message)
        self.subject = subject
        self.expected = expected
        self.found = found
        self.related = tuple(related)
        return self

    @classmethod
    def invalid(cls, variable: Variable, found: str, expected: str) -> Problem:
        """A variable whose value is not one it accepts; `found` as it may be shown (settings.shown)."""
        return cls(f"{variable}={found} is invalid: expected {expected}.", variable, expected=expected, found=found)

    @property
    def variables(self) -> tuple[Variable, ...]:
        """Every variable this problem names as data: its subject, then the related ones."""
        first = (self.subject,) if isinstance(self.subject, Variable) else ()
        return first + self.related

    def as_json(self) -> dict[str, Any]:
        return {
            "message": str(self),
            "subject": self.subject.as_json() if self.subject is not None else None,
            "expected": self.expected,
            "found": self.found,
            "related": [v.name for v in self.related],
        }


def as_problem(message: str) -> Problem:
    """A sentence as a Problem (one not yet given its data has no subject)."""
    return message if isinstance(message, Problem) else Problem(message)


class UserError(Exception):
    """Bad input. `problems` are complete sentences, each naming the variable (or file) at fault; those made as
    `Problem`s carry it as data too (`details`)."""

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = list(problems)

    @property
    def details(self) -> list[Problem]:
        return [as_problem(p) for p in self.problems]
