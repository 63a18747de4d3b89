"""generation: text from a policy (a shared package below the step packages).

- :mod:`~preftune.generation.candidates`: prompt loading and selection, policy resolution,
  N candidate answers per prompt (batched, seeded, KV cache) and the ``candidates.jsonl`` records:
  collect samples candidates for raters, ppo reads its prompts, observe queues hard cases.
- :mod:`~preftune.generation.policy`: a saved policy folder loaded for inference (full weights or
  a LoRA adapter on its base), sampling and response log-probabilities: evaluate, promote and the
  policy's MLflow pyfunc (``preftune.policy_model``) use it.

Importing this package is cheap (torch and transformers are imported by the modules that need them).
"""
