"""The importer: files of one format -> judgements + pairs + a validation report."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from preftune.data.formats.containers import expand_inputs, read_raw_records
from preftune.data.formats.fields import Ctx, FormatOptions, _norm, _Texts
from preftune.data.formats.registry import BY_NAME, FORMATS, describe_formats, detect_format
from preftune.data.records import Judgement, Pair, prompt_key
from preftune.data.validation import RecordError, ValidationReport
from preftune.errors import InputError

MAX_REJECTED = 10_000  # rejected records kept for rejected.jsonl (the counts are always complete)
DETECT_WINDOW = 100  # records read before giving up on detecting the format


class Importer:
    """Normalises records of one format, dropping duplicates, with a :class:`ValidationReport`."""

    def __init__(self, report: ValidationReport, max_chars: int | None, options: FormatOptions | None = None):
        self.report = report
        self.max_chars = max_chars
        self.options = options or FormatOptions()
        self.judgements: list[Judgement] = []
        self.pairs: list[Pair] = []
        self.rejected: list[dict[str, Any]] = []  # {"where", "reason", "detail", "record"}
        self._seen: set[tuple] = set()
        self._groups: dict[str, list[tuple[dict, str, str, float]]] = defaultdict(list)
        self._group_where: dict[str, str] = {}

    def _reject(self, reason: str, where: str, detail: str, rec: Any) -> None:
        self.report.drop(reason, where, detail)  # raises first in strict mode
        if len(self.rejected) < MAX_REJECTED:
            self.rejected.append({"where": where, "reason": reason, "detail": detail, "record": rec})

    def add(self, fmt: str, rec: Any, where: str) -> None:
        """Convert one parsed record; problems are counted (or raised in strict mode)."""
        if not isinstance(rec, dict):
            self._reject("schema_error", where, f"expected a JSON object, got {type(rec).__name__}", rec)
            return
        spec = BY_NAME[fmt]
        ctx = Ctx(_Texts(self.max_chars), where, self.options)
        try:
            if spec.row is not None:  # grouped format: converted when the whole input has been read
                prompt, response, score = spec.row(rec, ctx)
                key = prompt_key(prompt)
                self._groups[key].append((rec, prompt, response, score))
                self._group_where.setdefault(key, where)
                self.report.records_kept += 1
                return
            out = spec.convert(rec, ctx)
        except RecordError as err:
            detail = f"{fmt}: {err.detail}" if err.reason == "schema_error" else err.detail
            self._reject(err.reason, where, detail, rec)
            return
        self._keep(out if isinstance(out, list) else [out], ctx, where, rec)

    def _keep(self, outs: list[Pair | Judgement], ctx: Ctx, where: str, rec: Any) -> None:
        kept = 0
        for out in outs:
            if isinstance(out, Judgement):
                key: tuple = ("j", out.item_id, out.rater_id)
            else:
                key = ("p", prompt_key(out.prompt), _norm(out.chosen), _norm(out.rejected), out.rater_id)
            if key in self._seen:
                continue
            self._seen.add(key)
            (self.judgements if isinstance(out, Judgement) else self.pairs).append(out)
            kept += 1
        if not kept:
            what = "judgement of this item by this rater" if isinstance(outs[0], Judgement) else "pair"
            self._reject("duplicate", where, f"the same {what} appeared earlier; kept the first", rec)
            return
        if ctx.texts.cut:
            self.report.repair("truncated", where, f"cut to {self.max_chars} chars: {', '.join(ctx.texts.cut)}")
        self.report.records_kept += 1

    def finish(self) -> None:
        """Convert the grouped formats' collected rows (one group a prompt)."""
        groups, self._groups = self._groups, defaultdict(list)
        fmt = BY_NAME["helpsteer"]
        for key, rows in groups.items():
            where = self._group_where.pop(key)
            ctx = Ctx(_Texts(self.max_chars), where, self.options)
            if len(rows) < 2:
                self.report.records_kept -= 1
                self._reject("single_response", where, "helpsteer: the only scored response to its prompt", rows[0][0])
                continue
            try:
                out = fmt.group(rows, ctx)
            except RecordError as err:
                self.report.records_kept -= len(rows)
                for rec, *_ in rows:
                    self._reject(err.reason, where, f"helpsteer: {err.detail}", rec)
                continue
            self.report.records_kept -= 1  # every row was counted as kept above; _keep counts once more
            self._keep(out, ctx, where, rows[0][0])

    def add_judgement(self, judgement: Judgement) -> None:
        """A judgement made in-process (the simulated panel): deduplicated, never converted."""
        key = ("j", judgement.item_id, judgement.rater_id)
        if key in self._seen:
            self.report.drop("duplicate", judgement.where or judgement.item_id, "the same rater judged this item twice")
            return
        self._seen.add(key)
        self.judgements.append(judgement)
        self.report.records_kept += 1

    def add_file(self, uri: str, data: bytes, fmt: str = "auto") -> str:
        """Import one file's bytes (any container); returns the format used."""
        if fmt != "auto" and fmt not in BY_NAME:
            raise InputError(f"{uri}: unknown format {fmt!r} (expected auto, {', '.join(FORMATS)})")
        self.report.sources.append(uri)
        chosen = None if fmt == "auto" else fmt
        pending: list[tuple[str, Any]] = []
        for where, rec in read_raw_records(uri, data, self.report):
            if chosen is None:
                detected = detect_format(rec)
                if detected is None:
                    pending.append((where, rec))  # decided by the first recognisable record
                    if len(pending) > DETECT_WINDOW:
                        break
                    continue
                chosen = detected
                for w, r in pending:
                    self.add(chosen, r, w)
                pending.clear()
            self.add(chosen, rec, where)
        if chosen is None:
            first = pending[0] if pending else None
            if first is None:
                raise InputError(f"{uri}: no record could be read (the file is empty, or no line is valid UTF-8 JSON)")
            keys = sorted(first[1]) if isinstance(first[1], dict) else type(first[1]).__name__
            raise InputError(
                f"{first[0]}: cannot detect the format (keys {keys}); expected one of: {describe_formats()}; "
                "or pass --format"
            )
        self.finish()
        return chosen

    def add_path(self, uri: str, storage: Any, fmt: str = "auto") -> str:
        """Import a file, a folder of shards or a ``datasets.save_to_disk`` folder (local or s3://).
        Every shard must be of one format (detected on the first); returns it."""
        used = fmt
        for shard in expand_inputs(uri, storage):
            found = self.add_file(shard, storage.read_bytes(shard), used)
            if used == "auto":
                used = found
        return used


def nothing_kept_message(uri: str, report: ValidationReport, where_written: str | None) -> str:
    """Why an import kept nothing: the top drop reasons, counts and one example each."""
    top = sorted(report.dropped.items(), key=lambda kv: -kv[1])[:3]
    parts = []
    for reason, count in top:
        example = (report.examples.get(reason) or [""])[0]
        parts.append(f"{reason} x{count} (e.g. {example})")
    msg = f"{uri}: nothing to publish: {report.records_kept} of {report.records_read} records kept"
    if parts:
        msg += "; dropped: " + "; ".join(parts)
    if where_written:
        msg += f"; the validation report and the rejected records are in {where_written}"
    return msg
