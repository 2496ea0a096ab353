"""Errors raised by cpattn. Every error says what was asked, why it cannot be done and what to use instead."""

from __future__ import annotations


class CpattnError(RuntimeError):
    """Base class of every error cpattn raises on purpose."""


class UnsupportedInputError(CpattnError, ValueError):
    """A provider or schedule was asked for something it cannot honour.

    Raised before any kernel runs and before any collective, so every rank raises the same error.
    """

    def __init__(self, who: str, reasons: list[str], suggestion: str | None = None):
        self.who = who
        self.reasons = list(reasons)
        self.suggestion = suggestion
        lines = [f"{who} cannot take these inputs:"]
        lines += [f"  - {r}" for r in self.reasons]
        if suggestion:
            lines.append(f"  Use instead: {suggestion}")
        super().__init__("\n".join(lines))


class ProviderUnavailableError(CpattnError, ImportError):
    """The library behind a provider is missing, too old, broken, or the hardware does not fit."""


class InvalidArgumentError(CpattnError, ValueError):
    """An argument is malformed regardless of provider (wrong rank, dtype mix, unknown option...)."""


class RankMismatchError(CpattnError):
    """Ranks of one context-parallel group disagree about a call (shapes, dtypes, provider, flags)."""


class CommTimeoutError(CpattnError, TimeoutError):
    """A point-to-point or collective wait ran past its deadline; names the peer rank."""


class NoAttentionCallError(CpattnError, RuntimeError):
    """A context-parallel block over several ranks ended without an attention call reaching cpattn: the model's
    attention ran elsewhere, on local shards alone, which is wrong under context parallelism."""
