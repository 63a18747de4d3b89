"""The validation report of an import: every dropped or repaired record, counted by reason.

Why a report and not silent skipping: a preference dataset that quietly lost a third of its
records (bad encoding, a schema drift in an export, duplicated rows) trains a reward model on
something else than what the team believes. Every record that does not arrive unchanged in the
dataset is counted here under one reason, with a few ``file:line`` examples, and the report is
published with the dataset (``validation.json`` and ``validation.md``).

A *record* is one line (JSONL) or row (Parquet) of any input -- the prompt set, a judgement or
preference file -- or one judgement of the simulated panel.

``strict`` turns the first drop or repair into an :class:`~preftune.errors.InputError` naming the
file, line and reason, so that scripts can insist on clean inputs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from preftune.errors import InputError

# Reason -> (kind, plain-words meaning). "drop": the record is not in the dataset;
# "repair": it is, changed as described.
REASONS: dict[str, tuple[str, str]] = {
    "schema_error": ("drop", "not valid JSON, or a field missing, mistyped or inconsistent for the format"),
    "invalid_utf8": ("drop", "the line is not valid UTF-8"),
    "empty_text": ("drop", "empty prompt, chosen or rejected text"),
    "identical_chosen_rejected": ("drop", "chosen and rejected are the same text: no preference to learn"),
    "single_response": (
        "drop",
        "a prompt with only one scored response (per-response score formats): nothing to compare",
    ),
    "duplicate": ("drop", "the same record (or the same rater's judgement of the same item) was seen before"),
    "truncated": ("repair", "a prompt or response longer than data.max_chars was cut to data.max_chars"),
}

MAX_EXAMPLES = 5


class RecordError(Exception):
    """One record cannot be used; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown validation reason {reason!r}")
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class ValidationReport:
    """Counts of what an import read, kept, dropped and repaired."""

    strict: bool = False
    max_chars: int | None = None
    sources: list[str] = field(default_factory=list)
    records_read: int = 0
    records_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def _note(self, reason: str, where: str, detail: str) -> None:
        kind = REASONS[reason][0]
        if self.strict:
            raise InputError(
                f"{where}: {reason}: {detail} (--strict fails on any {'dropped' if kind == 'drop' else 'repaired'} "
                "record; run without --strict to get the full validation report)"
            )
        (self.dropped if kind == "drop" else self.repaired)[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"{where}: {detail}")

    def drop(self, reason: str, where: str, detail: str) -> None:
        """Record that the record at ``where`` is left out (raises in strict mode)."""
        if REASONS[reason][0] != "drop":
            raise ValueError(f"{reason!r} is not a drop reason")
        self._note(reason, where, detail)

    def repair(self, reason: str, where: str, detail: str) -> None:
        """Record that the record at ``where`` was changed to fit (raises in strict mode)."""
        if REASONS[reason][0] != "repair":
            raise ValueError(f"{reason!r} is not a repair reason")
        self._note(reason, where, detail)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def n_repaired(self) -> int:
        return sum(self.repaired.values())

    @property
    def clean(self) -> bool:
        return not self.dropped and not self.repaired

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "preftune.validation",
            "version": 1,
            "strict": self.strict,
            "max_chars": self.max_chars,
            "sources": list(self.sources),
            "records_read": self.records_read,
            "records_kept": self.records_kept,
            "dropped": dict(sorted(self.dropped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
            "reasons": {k: {"kind": kind, "meaning": meaning} for k, (kind, meaning) in REASONS.items()},
        }

    def to_markdown(self) -> str:
        lines = ["# Validation report", ""]
        if self.sources:
            lines.append("Sources: " + ", ".join(f"`{s}`" for s in self.sources))
            lines.append("")
        lines += [
            f"- records read: {self.records_read}",
            f"- records kept: {self.records_kept}",
            f"- dropped: {self.n_dropped}",
            f"- repaired (kept, changed): {self.n_repaired}",
            "",
        ]
        if self.clean:
            lines.append("Every record was kept unchanged.")
            return "\n".join(lines) + "\n"
        lines += ["| reason | kind | records | meaning |", "|---|---|---:|---|"]
        for reason, (kind, meaning) in REASONS.items():
            n = self.dropped.get(reason, 0) + self.repaired.get(reason, 0)
            if n:
                lines.append(f"| {reason} | {kind} | {n} | {meaning} |")
        lines.append("")
        for reason, examples in sorted(self.examples.items()):
            lines.append(f"## {reason}: examples")
            lines.append("")
            lines += [f"- `{ex}`" for ex in examples]
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"
