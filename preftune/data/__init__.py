"""data: the preference data every step shares (a shared package below the step packages).

- :mod:`~preftune.data.records`: the record types (``Judgement``, ``Pair``), file-format versions,
  ids and keys.
- :mod:`~preftune.data.dataset`: the preference dataset folder (``dataset.json``, ``train.jsonl``,
  ``eval.jsonl``): built and published by collect, re-read and re-published by check-fit.
- :mod:`~preftune.data.validation`: per-record errors and the validation report.
- :mod:`~preftune.data.formats`: the import formats registry (HH-RLHF, UltraFeedback, ...), read by
  collect and by observe's production sources.

Importing this package is cheap (no torch, no mlflow).
"""
