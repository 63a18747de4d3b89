"""behaviour: what "better behaviour" means and how it is judged (a shared package below the step packages).

- :mod:`~preftune.behaviour.suite`: read, validate and resolve a behaviour suite (``load_suite``,
  ``parse_suite``, ``thresholds_for``); :mod:`~preftune.behaviour.suite_model` the resolved suite,
  :mod:`~preftune.behaviour.suite_schema` its file format, :mod:`~preftune.behaviour.suite_files`
  reading files and reporting problems with their lines.
- :mod:`~preftune.behaviour.judges`: the pluggable judges (rules, classifier, reward, llm,
  embedding, ensemble, demo), ``load_judges`` and ``judge_by_family``.
- :mod:`~preftune.behaviour.calibration`: each judge's agreement with the suite's human labels.
- :mod:`~preftune.behaviour.thresholds`: the behaviour metrics a suite or a run config may bound.

evaluate gates on them, ppo reports its policy's behaviour with them, observe watches the
champion in production with them. Importing this package is cheap.
"""
