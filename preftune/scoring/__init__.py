"""scoring: a published reward model at inference (a shared package below the step packages).

- :mod:`~preftune.scoring.model`: :class:`RewardScorer` (load a published reward model, score
  prompt/response pairs: what ppo and evaluate use) and the reward model's save/load helpers.
- :mod:`~preftune.scoring.metadata`: ``reward_model.json`` (:class:`RewardModelMeta`).
- :mod:`~preftune.scoring.batching`: token ids and length-bucketed batches for a
  sequence-classification head (scoring and reward training share them).
- :mod:`~preftune.scoring.text_view`: which part of a prompt the reward model reads
  (``reward.text_view``: the whole conversation, or its last user turn).
- :mod:`~preftune.scoring.baselines`: the trivial baselines (length rule, bag-of-words) that
  check-fit's quality figures and train-reward's gate compare against.

Training the reward model is the train-reward step's own (``preftune.reward``). Importing this
package is cheap (torch is imported by ``scoring.model`` only).
"""
