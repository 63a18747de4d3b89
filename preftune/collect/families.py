"""Behaviour families for real data: ``data.families`` maps imported records to families.

Public preference sets rarely carry preftune's ``family`` field, and without families every
pair lands in ``default``: per-family fit verdicts, reward accuracy, gates and PPO balancing
then have nothing to work on. The mapping is applied when a file is imported
(``preftune collect --from-file`` and ``data.judgements: file``), on every kept record, in
this order -- the first that gives a family wins:

1. **field**: a field of the raw record (``data.families.field``, a dotted path such as
   ``category`` or ``meta.topic``; default ``family``, so files that carry preftune's own field
   keep working). With ``values`` set, only the listed values map (``{value: family}``);
   other values fall through to the next step.
2. **rules**: ``data.families.rules``, in order, on the prompt text (multi-turn prompts as
   flattened by the importer): a rule has a ``regex`` (Python syntax, ``(?i)`` for case-blind)
   or ``keywords`` (whole words, case-blind).
3. **classifier**: a text-classification model folder (``from_pretrained`` of
   ``AutoModelForSequenceClassification``, local or s3://) run on the prompts still unmapped,
   in batches after the import; its label (``config.id2label``, renamed through
   ``classifier_labels`` when given) is the family when its probability reaches
   ``classifier_min_confidence``.
4. otherwise ``data.families.default`` (``default``).

The mapping used and how many records each step mapped to each family are stored with the
dataset (``dataset.json``'s ``families_mapping``), so a reader knows where the families came
from; because families are part of the records, a different mapping is a different dataset
version.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from preftune.configbase import Section

if TYPE_CHECKING:  # pragma: no cover
    from preftune.data.formats import FormatOptions
    from preftune.data.records import Judgement, Pair
    from preftune.data.validation import ValidationReport

MAPPING_FORMAT = "preftune.families"
METHODS = ("field", "rule", "classifier", "default")


class FamilyRule(Section):
    """One rule: a family for prompts matching a regex or containing one of the keywords."""

    family: str = Field(..., min_length=1, max_length=100, description="The family of matching records.")
    regex: str | None = Field(None, description="A Python regular expression searched in the prompt text.")
    keywords: list[str] = Field(
        default_factory=list, description="Words (or phrases) matched as whole words, ignoring case."
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return v

    @model_validator(mode="after")
    def _one_matcher(self) -> FamilyRule:
        if bool(self.regex) == bool(self.keywords):
            raise ValueError("give either 'regex' or 'keywords' (exactly one) for each rule")
        if any(not k.strip() for k in self.keywords):
            raise ValueError("keywords must not be empty strings")
        return self

    def pattern(self) -> re.Pattern[str]:
        if self.regex:
            return re.compile(self.regex)
        words = "|".join(re.escape(" ".join(k.split())).replace(r"\ ", r"\s+") for k in self.keywords)
        return re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)


class FamiliesSection(Section):
    """How imported records get their behaviour family (field, rules on the prompt, a classifier)."""

    field: str | None = Field(
        "family",
        description="Record field (dotted path, e.g. 'category' or 'meta.topic') whose value is the family. "
        "Empty: not used.",
    )
    values: dict[str, str] = Field(
        default_factory=dict,
        description="Rename field values to families ({value: family}); when given, values not listed fall "
        "through to the rules.",
    )
    rules: list[FamilyRule] = Field(
        default_factory=list,
        description="Rules on the prompt text, first match wins: [{family, regex}] or [{family, keywords: [...]}].",
    )
    classifier: str | None = Field(
        None,
        description="A text-classification model folder or s3:// URI (AutoModelForSequenceClassification) "
        "for prompts still unmapped; its label is the family.",
    )
    classifier_labels: dict[str, str] = Field(
        default_factory=dict, description="Rename classifier labels to families ({label: family})."
    )
    classifier_min_confidence: float = Field(
        0.5, ge=0.0, le=1.0, description="The classifier's label is used when its probability reaches this."
    )
    classifier_batch_size: int = Field(32, ge=1, description="Prompts per classifier batch.")
    default: str = Field("default", min_length=1, max_length=100, description="The family of unmapped records.")

    @property
    def is_default(self) -> bool:
        """The mapping of a config that does not mention data.families (the format's family field)."""
        return self == FamiliesSection()


def _field_value(rec: Any, path: str) -> Any:
    cur = rec
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


class FamilyMapper:
    """Applies a :class:`FamiliesSection` to records; counts how each family was assigned."""

    def __init__(self, section: FamiliesSection, storage: Any = None):
        self.section = section
        self.storage = storage
        self._rules = [(r.family, r.pattern()) for r in section.rules]
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)  # method -> family -> records
        self._pending: list[tuple[Any, str]] = []  # (record object, prompt) for the classifier

    def by_field(self, rec: Any) -> str | None:
        if not self.section.field:
            return None
        value = _field_value(rec, self.section.field)
        if value is None or isinstance(value, (dict, list)):
            return None
        text = str(value).strip()
        if not text:
            return None
        if self.section.values:
            return self.section.values.get(text)
        return text[:100]

    def by_rules(self, prompt: str) -> str | None:
        for family, pattern in self._rules:
            if pattern.search(prompt):
                return family
        return None

    def assign(self, rec: Any, out: Pair | Judgement) -> None:
        """Set ``out.family`` from the raw record ``rec`` (or queue it for the classifier)."""
        family = self.by_field(rec)
        method = "field"
        if family is None:
            family, method = self.by_rules(out.prompt), "rule"
        if family is None and self.section.classifier:
            self._pending.append((out, out.prompt))
            return
        if family is None:
            family, method = self.section.default, "default"
        out.family = family
        self.counts[method][family] += 1

    def finish(self) -> None:
        """Classify the prompts no field or rule mapped (one batched pass)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        labels = classify_prompts(
            self.section.classifier or "",
            [p for _, p in pending],
            storage=self.storage,
            batch_size=self.section.classifier_batch_size,
        )
        for (out, _), (label, prob) in zip(pending, labels, strict=True):
            if prob >= self.section.classifier_min_confidence:
                family, method = self.section.classifier_labels.get(label, label), "classifier"
            else:
                family, method = self.section.default, "default"
            out.family = family
            self.counts[method][family] += 1

    def to_meta(self) -> dict[str, Any]:
        """What ``dataset.json`` keeps: the mapping and how many records each step mapped to each family."""
        by_method = {m: dict(sorted(self.counts[m].items())) for m in METHODS if self.counts.get(m)}
        totals: Counter[str] = Counter()
        for c in self.counts.values():
            totals.update(c)
        return {
            "format": MAPPING_FORMAT,
            "version": 1,
            "mapping": self.section.model_dump(mode="json"),
            "records": dict(sorted(totals.items())),
            "by_method": by_method,
        }


def classify_prompts(
    model_uri: str, prompts: list[str], *, storage: Any = None, batch_size: int = 32
) -> list[tuple[str, float]]:
    """(label, probability) of the top class for each prompt, from a sequence-classification folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.errors import InputError

    if storage is None:
        from preftune.storage import Storage

        storage = Storage()
    path = storage.local_path(model_uri)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(
            f"data.families.classifier {model_uri}: not a text-classification model folder "
            f"(from_pretrained failed: {str(err).splitlines()[0]})"
        ) from None
    model.eval()
    id2label = model.config.id2label or {}
    out: list[tuple[str, float]] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            enc = tok(batch, truncation=True, max_length=256, padding=True, return_tensors="pt")
            probs = torch.softmax(model(**enc).logits.float(), dim=-1)
            top = probs.max(dim=-1)
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                out.append((str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))), float(p)))
    return out


def make_importer(
    report: ValidationReport,
    max_chars: int | None,
    options: FormatOptions | None,
    families: FamiliesSection,
    storage: Any = None,
):
    """An :class:`~preftune.data.formats.Importer` that also applies ``families`` to every kept record.

    Its ``families_meta()`` is what the dataset stores (``None`` for the default mapping, which is
    the format's own ``family`` field: older datasets keep their hash).
    """
    from preftune.data.formats import Importer

    mapper = FamilyMapper(families, storage)

    class FamilyImporter(Importer):
        def _keep(self, outs, ctx, where, rec):  # noqa: ANN001 - the Importer's signature
            n_pairs, n_judgements = len(self.pairs), len(self.judgements)
            super()._keep(outs, ctx, where, rec)
            for out in self.pairs[n_pairs:] + self.judgements[n_judgements:]:  # the ones kept (not duplicates)
                mapper.assign(rec, out)

        def add_path(self, uri: str, storage: Any, fmt: str = "auto") -> str:
            used = super().add_path(uri, storage, fmt)
            mapper.finish()
            return used

        def families_meta(self) -> dict[str, Any] | None:
            return None if families.is_default else mapper.to_meta()

    return FamilyImporter(report, max_chars, options)
