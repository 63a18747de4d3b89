"""User-facing errors and the exit codes of every preftune step.

A :class:`PreftuneError` is something the user can act on: the CLI prints its one-line
message (no traceback) and exits with its ``exit_code``. The codes are part of the
contract in ``docs/architecture.md``; the pipeline branches on them.
"""

from __future__ import annotations


class ExitCode:
    OK = 0
    INTERNAL = 1  # a bug: traceback printed
    CONFIG = 2  # invalid run config, suite file or command-line usage
    INPUT = 3  # bad input data (file, record, URI)
    UNREACHABLE = 4  # tracking server, registry, storage or cluster cannot be reached
    CREDENTIALS = 5  # credentials missing or rejected
    NOT_FIT = 10  # check-fit: no behaviour family is fit for PPO
    REWARD_GATE = 11  # train-reward: held-out accuracy below the gate
    TRAINING_DIVERGED = 12  # ppo: NaN/inf or KL blow-up
    GATE_FAILED = 13  # evaluate/promote: a gate failed, champion unchanged
    DRIFT = 20  # observe: the champion's behaviour mix moved (drift test), no gate broken
    REGRESSION = 21  # observe: a forbidden share broke its gate in production


class PreftuneError(Exception):
    """An error with a message a user can act on and a stable exit code."""

    exit_code: int = ExitCode.INTERNAL

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(PreftuneError):
    exit_code = ExitCode.CONFIG


class InputError(PreftuneError):
    exit_code = ExitCode.INPUT


class UnreachableError(PreftuneError):
    exit_code = ExitCode.UNREACHABLE


class CredentialsError(PreftuneError):
    exit_code = ExitCode.CREDENTIALS


class StorageError(PreftuneError):
    exit_code = ExitCode.INPUT
