"""What every exercise checker returns and prints."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CheckResult", "failed", "not_attempted", "passed"]


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one checker run; truthy when the exercise passed.

    ``str()`` is the line the checker prints: ``PASS check_name: reason`` or
    ``FAIL check_name: reason``, the reason carrying the numbers that decided it.
    """

    exercise: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.exercise}: {self.message}"


def _report(result: CheckResult) -> CheckResult:
    print(result)
    return result


def passed(exercise: str, message: str) -> CheckResult:
    """Print and return a passing result."""
    return _report(CheckResult(exercise, True, message))


def failed(exercise: str, message: str) -> CheckResult:
    """Print and return a failing result; ``message`` says what was expected and what happened."""
    return _report(CheckResult(exercise, False, message))


def not_attempted(exercise: str, what: str) -> CheckResult:
    """The student's function still raises ``NotImplementedError``."""
    return failed(exercise, f"not attempted yet: {what}, then run this cell again")
