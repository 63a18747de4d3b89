"""The preference dataset: split by prompt, versioned by content hash, published atomically.

Layout (the brief's contract; every file is UTF-8 JSONL or JSON)::

    <output>/
      dataset.json       format, version, hash, counts, families, sources, excluded_families, ...
      train.jsonl        pairs (chosen preferred to rejected), prompts disjoint from eval
      eval.jsonl         pairs of the held-out prompts
      judgements.jsonl   normalised preftune.judgement v1 records (empty for pure pair imports)
      validation.json    dropped/repaired record counts by reason, with file:line examples
      validation.md
      candidates.jsonl   (generated datasets only) the sampled candidates, preftune.candidates v1

Why these choices:

- *Split by prompt, stratified by family.* The eval pairs decide the reward gate; a prompt
  whose pairs sit on both sides would let the reward model be graded on what it memorised. Each
  family's prompts are ordered by a seeded hash and the first ``round(eval_fraction * n)``
  (at least one, never all) are held out, so every family is evaluated and the split is the same
  for the same seed and prompts. Prompts are identified by their whitespace-normalised text, so
  two ids for the same text still land on the same side. Families with a single prompt are
  pooled and split together.
- *Content hash as version.* ``sha256`` over the canonical JSON lines of train, eval and
  judgements (sorted keys, in file order), leaving out ``created_at`` timestamps: they are
  provenance, not content, and re-collecting the same data must give the same version. Records
  are written in a canonical order (family, prompt, id), so the input order does not change it.
- *Atomic publish.* The folder is assembled in a local temporary folder and published with
  :meth:`preftune.storage.Storage.put_dir` (rename locally, completion marker on S3): a reader
  sees the whole dataset or none. An output containing ``{hash}`` is named by the content hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.common.metadata import DATASET_FORMAT, DATASET_VERSION, read_dataset_json
from preftune.data.records import Judgement, Pair, prompt_key, short_hash, utc_now
from preftune.errors import InputError

VOLATILE_KEYS = ("created_at",)
DATASET_FILES = ("dataset.json", "train.jsonl", "eval.jsonl", "judgements.jsonl", "validation.json", "validation.md")


def canonical_line(record: Mapping[str, Any], *, drop: Sequence[str] = ()) -> str:
    rec = {k: v for k, v in record.items() if k not in drop}
    return json.dumps(rec, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def content_hash(
    train: Iterable[Mapping[str, Any]], eval_: Iterable[Mapping[str, Any]], judgements: Iterable[Mapping[str, Any]]
) -> str:
    """The dataset version: sha256 of its content, timestamps left out (see the module docstring)."""
    digest = hashlib.sha256()
    for name, records in (("train", train), ("eval", eval_), ("judgements", judgements)):
        digest.update(f"--{name}--\n".encode())
        for rec in records:
            digest.update(canonical_line(rec, drop=VOLATILE_KEYS).encode("utf-8"))
            digest.update(b"\n")
    return digest.hexdigest()


def split_by_prompt(pairs: Sequence[Pair], eval_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Train and eval pairs with no prompt on both sides (stratified by family, seeded)."""
    family_of: dict[str, str] = {}
    for p in pairs:
        family_of.setdefault(prompt_key(p.prompt), p.family)
    strata: dict[str, list[str]] = defaultdict(list)
    for key, family in family_of.items():
        strata[family].append(key)
    singles = [keys[0] for keys in strata.values() if len(keys) == 1]
    groups = [keys for keys in strata.values() if len(keys) > 1]
    if len(singles) > 1:
        groups.append(singles)
    eval_keys: set[str] = set()
    for keys in groups:
        ordered = sorted(keys, key=lambda k: short_hash("split", seed, k))
        n_eval = min(len(ordered) - 1, max(1, round(eval_fraction * len(ordered))))
        eval_keys.update(ordered[:n_eval])
    train = [p for p in pairs if prompt_key(p.prompt) not in eval_keys]
    eval_ = [p for p in pairs if prompt_key(p.prompt) in eval_keys]
    return train, eval_


def _pair_order(p: Pair) -> tuple:
    return (p.family, p.prompt_id, p.item_id, p.pair_id)


def _judgement_order(j: Judgement) -> tuple:
    return (j.family, j.prompt_id, j.item_id, j.rater_id)


def _jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(canonical_line(r) + "\n" for r in records)


@dataclass
class BuiltDataset:
    """A complete dataset folder on local disk, not yet published."""

    local_dir: Path
    meta: dict[str, Any]
    train: list[Pair]
    eval: list[Pair]
    judgements: list[Judgement]
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def hash(self) -> str:
        return str(self.meta["hash"])

    def cleanup(self) -> None:
        shutil.rmtree(self.local_dir, ignore_errors=True)


def build_dataset(
    *,
    pairs: Sequence[Pair],
    judgements: Sequence[Judgement],
    eval_fraction: float,
    seed: int,
    validation: Mapping[str, Any],
    validation_md: str,
    config_hash: str | None = None,
    excluded_families: Sequence[str] = (),
    candidates: Sequence[Mapping[str, Any]] = (),
    extra_meta: Mapping[str, Any] | None = None,
    split: tuple[Sequence[Pair], Sequence[Pair]] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> BuiltDataset:
    """Split (unless ``split`` is given), hash and write every file into a local temporary folder."""
    if not pairs:
        raise InputError(
            "no preference pairs to publish: every record was dropped, all judgements were 'all unacceptable', "
            "or every pair was a tie (see the validation report counts)"
        )
    if split is None:
        train, eval_ = split_by_prompt(pairs, eval_fraction, seed)
    else:
        train, eval_ = list(split[0]), list(split[1])
    if not train or not eval_:
        n_prompts = len({prompt_key(p.prompt) for p in pairs})
        raise InputError(
            f"only {n_prompts} distinct prompt(s): cannot hold out prompts for evaluation "
            "(a dataset needs at least 2 prompts, split by prompt)"
        )
    train = sorted(train, key=_pair_order)
    eval_ = sorted(eval_, key=_pair_order)
    judgements = sorted(judgements, key=_judgement_order)
    train_recs = [p.to_record() for p in train]
    eval_recs = [p.to_record() for p in eval_]
    judgement_recs = [j.to_record() for j in judgements]
    digest = content_hash(train_recs, eval_recs, judgement_recs)

    families: dict[str, dict[str, int]] = defaultdict(lambda: Counter())  # type: ignore[arg-type]
    prompts_by_family: dict[str, set[str]] = defaultdict(set)
    for p in train:
        families[p.family]["train_pairs"] += 1
        prompts_by_family[p.family].add(prompt_key(p.prompt))
    for p in eval_:
        families[p.family]["eval_pairs"] += 1
        prompts_by_family[p.family].add(prompt_key(p.prompt))
    for j in judgements:
        families[j.family]["judgements"] += 1
    family_meta = {
        f: {
            "train_pairs": c["train_pairs"],
            "eval_pairs": c["eval_pairs"],
            "prompts": len(prompts_by_family[f]),
            "judgements": c["judgements"],
        }
        for f, c in sorted(families.items())
    }
    # sources: judgements by their source, plus directly imported pairs (TRL, HH) by theirs
    judged_items = {j.item_id for j in judgements}
    sources = Counter(j.source for j in judgements)
    sources.update(p.source for p in list(train) + list(eval_) if p.item_id not in judged_items)
    train_prompts = {prompt_key(p.prompt) for p in train}
    eval_prompts = {prompt_key(p.prompt) for p in eval_}
    assert not train_prompts & eval_prompts, "split by prompt violated"
    meta: dict[str, Any] = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "hash": digest,
        "created_at": utc_now(),
        "counts": {
            "train_pairs": len(train),
            "eval_pairs": len(eval_),
            "prompts": len(train_prompts | eval_prompts),
            "train_prompts": len(train_prompts),
            "eval_prompts": len(eval_prompts),
            "judgements": len(judgements),
            "items": len(judged_items),
            "records_read": int(validation.get("records_read", 0)),
            "records_kept": int(validation.get("records_kept", 0)),
            "dropped": sum(validation.get("dropped", {}).values()),
            "repaired": sum(validation.get("repaired", {}).values()),
        },
        "families": family_meta,
        "sources": dict(sorted(sources.items())),
        "excluded_families": sorted(excluded_families),
        "config_hash": config_hash,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "hash_covers": "train.jsonl, eval.jsonl, judgements.jsonl (canonical JSON lines, created_at left out)",
    }
    if extra_meta:
        meta.update(extra_meta)

    local = Path(tempfile.mkdtemp(prefix="preftune-dataset-"))
    try:
        (local / "train.jsonl").write_text(_jsonl(train_recs), encoding="utf-8")
        (local / "eval.jsonl").write_text(_jsonl(eval_recs), encoding="utf-8")
        (local / "judgements.jsonl").write_text(_jsonl(judgement_recs), encoding="utf-8")
        (local / "validation.json").write_text(json.dumps(dict(validation), indent=2) + "\n", encoding="utf-8")
        (local / "validation.md").write_text(validation_md, encoding="utf-8")
        if candidates:
            (local / "candidates.jsonl").write_text(_jsonl(candidates), encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (local / name).write_text(text, encoding="utf-8")
        (local / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    return BuiltDataset(local, meta, list(train), list(eval_), list(judgements), list(candidates))


def resolve_output(output: str, digest: str) -> str:
    """The publish location: ``{hash}`` in ``output`` becomes the content hash."""
    return output.replace("{hash}", digest)


def publish(built: BuiltDataset, output: str, storage: Any) -> str:
    """Publish the folder atomically; returns the URI. The local copy is removed either way."""
    uri = resolve_output(output, built.hash)
    try:
        storage.put_dir(built.local_dir, uri)
    finally:
        built.cleanup()
    return uri


def mlflow_dataset(records: Sequence[Mapping[str, Any]], *, source: str, name: str, digest: str) -> Any:
    """An MLflow dataset of the pairs (one row a pair, ``split`` column), digest = content hash.

    MLflow stores at most 36 characters of digest; the full hash is in the input's tags.
    """
    import mlflow.data
    import pandas as pd

    rows = [{**{k: v for k, v in r.items() if k != "tags"}, "tags": ",".join(r.get("tags") or [])} for r in records]
    df = pd.DataFrame(rows)
    with warnings.catch_warnings():
        # a local path matches two equivalent artifact-source classes; MLflow warns and picks one
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:32])


def log_dataset_input(
    built_meta: Mapping[str, Any],
    train: Sequence[Pair],
    eval_: Sequence[Pair],
    uri: str,
    *,
    name: str = "preftune-preferences",
    context: str = "collect",
) -> None:
    """``mlflow.log_input`` of the dataset, with its hash, counts and source mix as tags."""
    import mlflow

    records = [{**p.to_record(), "split": "train"} for p in train] + [{**p.to_record(), "split": "eval"} for p in eval_]
    ds = mlflow_dataset(records, source=uri, name=name, digest=str(built_meta["hash"]))
    tags = {
        "preftune.dataset_hash": str(built_meta["hash"]),
        "preftune.dataset_uri": uri,
        "preftune.sources": json.dumps(built_meta.get("sources", {}), sort_keys=True),
        "preftune.counts": json.dumps(
            {k: built_meta["counts"][k] for k in ("train_pairs", "eval_pairs", "prompts", "judgements")},
            sort_keys=True,
        ),
    }
    mlflow.log_input(ds, context=context, tags=tags)


# --------------------------------------------------------------------------------------
# Reading a published dataset (check-fit)


@dataclass
class LoadedDataset:
    uri: str
    root: Path
    meta: dict[str, Any]
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    judgements: list[dict[str, Any]]
    validation: dict[str, Any] | None
    validation_md: str | None
    candidates: list[dict[str, Any]]


def read_jsonl(path: Path, required: bool = True) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one a line (blank lines skipped); InputError naming the file and line
    for anything else; ``[]`` for a missing file unless ``required``."""
    if not path.exists():
        if required:
            raise InputError(f"{path}: missing (a preftune dataset has train.jsonl, eval.jsonl, judgements.jsonl)")
        return []
    out = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(rec, dict):
                    raise InputError(f"{path}:{lineno}: expected a JSON object")
                out.append(rec)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return out


def load_dataset(uri: str, storage: Any) -> LoadedDataset:
    """Read a published dataset (local folder or s3:// URI, via the storage layer)."""
    root = Path(storage.local_path(uri)) if not Path(uri).is_dir() else Path(uri)
    meta = read_dataset_json(root, uri)
    validation = None
    if (root / "validation.json").exists():
        try:
            validation = json.loads((root / "validation.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{root / 'validation.json'}: cannot read: {err}") from None
    md = (root / "validation.md").read_text(encoding="utf-8") if (root / "validation.md").exists() else None
    return LoadedDataset(
        uri=uri,
        root=root,
        meta=meta,
        train=read_jsonl(root / "train.jsonl"),
        eval=read_jsonl(root / "eval.jsonl"),
        judgements=read_jsonl(root / "judgements.jsonl", required=False),
        validation=validation,
        validation_md=md,
        candidates=read_jsonl(root / "candidates.jsonl", required=False),
    )
