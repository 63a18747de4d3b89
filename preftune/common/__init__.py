"""Small helpers every step package shares, one home each (no step package imports another for them).

| module | owns |
| --- | --- |
| :mod:`~preftune.common.device` | the torch device (``$PREFTUNE_DEVICE``, a GPU when visible) and CPU-thread control |
| :mod:`~preftune.common.metadata` | reading a folder's metadata JSON (``dataset.json``, ``reward_model.json``, ...) |
| :mod:`~preftune.common.timestamps` | UTC timestamps as ``YYYY-MM-DDTHH:MM:SSZ`` |
| :mod:`~preftune.common.requirements` | the pinned pip requirements logged with MLflow models |
| :mod:`~preftune.common.environment` | environment variables set for a block and restored |

Nothing here imports a step package; torch is imported only inside the functions that need it.
"""
