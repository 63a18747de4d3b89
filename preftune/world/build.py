"""Build (once) and locate the demo world under the preftune home.

Why a cache keyed by config: the world takes about a minute to build and every step of a demo run
(collect, train-reward, ppo, evaluate) refers to it by name (``demo:policy``,
``demo:reward-base``, ``demo:prompts``). The folder ``<home>/world/<key>/`` is keyed by a hash of
the world config and :data:`WORLD_VERSION`, so a changed config or a changed builder gets a new
world and an old one is never silently reused.

The build runs in a child process by default (see :func:`ensure_world`). Atomicity: the world is
built in a temporary sibling folder and renamed into place only when
complete (the manifest is written last, then one ``os.rename``). A killed build leaves only a
``.tmp-*`` folder that the next build removes; a concurrent build of the same key waits on a file
lock and then reuses the finished world.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.config import WorldSection
from preftune.errors import ConfigError, InputError, PreftuneError, StorageError
from preftune.home import preftune_home
from preftune.world.sampling import sample_behaviour_shares

log = logging.getLogger(__name__)

WORLD_VERSION = "2"
"""Bump when the corpus, the classifier or the training recipe changes: it changes every world key."""

BUILD_THREADS = 2
"""Torch threads while building: a fixed count keeps float reductions, hence the weights, reproducible."""

MANIFEST_SAMPLES_PER_PROMPT = 8
"""Samples per held-out prompt for the base-policy behaviour shares recorded in the manifest."""

DEFAULT_MAX_NEW_TOKENS = 48
"""The generation budget collect and the demo use by default (``data.generation.max_new_tokens``)."""

MODEL_REFS = {"demo:policy": "policy", "demo:reward-base": "reward_base"}
PROMPT_REFS = {"demo:prompts": "prompts_train", "demo:prompts-eval": "prompts_eval"}


@dataclass(frozen=True)
class WorldPaths:
    """Where a built world's parts are (all inside ``root``)."""

    root: Path
    key: str

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def reward_base(self) -> Path:
        return self.root / "reward_base"

    @property
    def prompts_train(self) -> Path:
        return self.root / "prompts_train.jsonl"

    @property
    def prompts_eval(self) -> Path:
        return self.root / "prompts_eval.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest.read_text(encoding="utf-8"))


#: World settings that only the simulated rater panel reads at collect time (nothing built depends on
#: them), left out of the cache key so that changing them reuses the built world.
PANEL_ONLY = ("rater_write_rate",)


def world_key(world_cfg: WorldSection) -> str:
    """A short hash of the world config and the builder version."""
    built = world_cfg.model_dump(mode="json", exclude=set(PANEL_ONLY))
    canonical = json.dumps({"world": built, "version": WORLD_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def reward_vocab_size(policy_vocab_size: int) -> int:
    """The reward base's own vocabulary size: deliberately different from the policy's."""
    size = max(300, (3 * policy_vocab_size) // 4)
    return size if size != policy_vocab_size else policy_vocab_size + 64


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The records of a prompts JSONL file (``{"id","family","prompt","tags"}`` per line)."""
    p = Path(path)
    out = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{p}: cannot read the prompt file: {err}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{p}:{n}: not valid JSON: {err.msg}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise InputError(f"{p}:{n}: expected an object with a string 'prompt'")
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------
# Cache checks and locking


def _is_complete(paths: WorldPaths) -> bool:
    """True when the manifest exists, matches this key and version, and every listed file is there."""
    try:
        manifest = paths.read_manifest()
    except (OSError, ValueError):
        return False
    if manifest.get("version") != WORLD_VERSION or manifest.get("key") != paths.key:
        return False
    files = manifest.get("files") or {}
    for rel, meta in files.items():
        f = paths.root / rel
        try:
            if f.stat().st_size != meta["bytes"]:
                return False
        except OSError:
            return False
    return bool(files)


@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (released by the OS if the holder dies); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: the atomic rename still protects readers
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _reproducible_torch() -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the build; previous settings restored."""
    import torch
    import transformers

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_verbosity = transformers.logging.get_verbosity()
    prev_bars = transformers.utils.logging.is_progress_bar_enabled()
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
        transformers.logging.set_verbosity(prev_verbosity)
        if prev_bars:
            transformers.utils.logging.enable_progress_bar()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------
# Building


def _build_into(world_cfg: WorldSection, dest: Path, key: str, progress: bool | None) -> dict[str, Any]:
    """Write a complete world into ``dest`` (an empty folder); the manifest is written last."""
    import tokenizers
    import torch
    import transformers

    from preftune.world.corpus import build_corpus
    from preftune.world.policy import build_policy, build_reward_base
    from preftune.world.tokenizer import train_bpe_tokenizer

    start, cpu_start = time.perf_counter(), time.process_time()
    corpus = build_corpus(world_cfg.seed)
    _write_jsonl(dest / "prompts_train.jsonl", [r.to_json() for r in corpus.train])
    _write_jsonl(dest / "prompts_eval.jsonl", [r.to_json() for r in corpus.eval])
    texts = corpus.texts()
    with _reproducible_torch():
        policy_tok = train_bpe_tokenizer(texts, world_cfg.vocab_size, padding_side="left")
        reward_tok = train_bpe_tokenizer(texts, reward_vocab_size(world_cfg.vocab_size), padding_side="right")
        policy_stats = build_policy(corpus, policy_tok, world_cfg, dest / "policy", progress=progress)
        reward_stats = build_reward_base(corpus, reward_tok, world_cfg, dest / "reward_base", progress=progress)
        # The longest response (+ EOS) in policy tokens: generation budgets below it truncate answers,
        # which the classifier then rightly calls "unknown".
        max_response_tokens = 1 + max(len(policy_tok(" " + text)["input_ids"]) for _, _, text in corpus.sft_examples())
        if max_response_tokens > DEFAULT_MAX_NEW_TOKENS:
            log.warning(
                "demo world: with vocab_size=%d the longest answer takes %d tokens, more than the default "
                "max_new_tokens=%d; raise data.generation.max_new_tokens or vocab_size",
                world_cfg.vocab_size,
                max_response_tokens,
                DEFAULT_MAX_NEW_TOKENS,
            )
        eval_prompts = [r.to_json() for r in corpus.eval]
        shares = sample_behaviour_shares(
            dest / "policy",
            eval_prompts,
            MANIFEST_SAMPLES_PER_PROMPT,
            max_new_tokens=max(DEFAULT_MAX_NEW_TOKENS, max_response_tokens),
            seed=world_cfg.seed,
            progress=progress,
        )
    files = {
        str(p.relative_to(dest)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(dest.rglob("*"))
        if p.is_file()
    }
    manifest = {
        "format": "preftune.world",
        "version": WORLD_VERSION,
        "key": key,
        "config": world_cfg.model_dump(mode="json"),
        "corpus": {
            "train_prompts": len(corpus.train),
            "eval_prompts": len(corpus.eval),
            "held_out_slots": {k: list(v) for k, v in corpus.held_out_slots.items()},
        },
        "policy": {
            "architecture": "gpt2",
            "vocab_size": len(policy_tok),
            "max_response_tokens": max_response_tokens,
            "n_params": policy_stats.n_params,
            "sft_steps": policy_stats.steps,
            "final_loss": round(policy_stats.final_loss, 5),
            "seconds": round(policy_stats.seconds, 2),
        },
        "reward_base": {
            "architecture": "llama",
            "vocab_size": len(reward_tok),
            "n_params": reward_stats.n_params,
            "pretrain_steps": reward_stats.steps,
            "final_loss": round(reward_stats.final_loss, 5),
            "seconds": round(reward_stats.seconds, 2),
        },
        "base_shares": shares,
        "base_shares_samples_per_prompt": MANIFEST_SAMPLES_PER_PROMPT,
        "base_shares_prompts": "prompts_eval.jsonl",
        "files": files,
        "libraries": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "build_threads": BUILD_THREADS,
        "build_seconds": round(time.perf_counter() - start, 2),
        "build_cpu_seconds": round(time.process_time() - cpu_start, 2),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _world_paths(world_cfg: WorldSection, home: Path | str | None) -> WorldPaths:
    base = (Path(home).expanduser() if home is not None else preftune_home()) / "world"
    key = world_key(world_cfg)
    return WorldPaths(root=base / key, key=key)


def ensure_world(
    world_cfg: WorldSection | None = None,
    home: Path | str | None = None,
    *,
    progress: bool | None = None,
    isolated: bool = True,
) -> WorldPaths:
    """The demo world for ``world_cfg`` under ``<home>/world/<key>/``, built first if not cached.

    ``home`` defaults to the preftune home (``$PREFTUNE_HOME`` or ``~/.preftune``). Safe to call from
    several processes at once: one builds, the others wait and reuse its result.

    With ``isolated`` (the default) the build runs in a child Python process with fixed numeric
    settings (``BUILD_THREADS`` OpenMP threads that wait passively): the weights then do not depend
    on the caller's torch settings, and a busy machine (or a pod at its CPU limit) slows the build
    down instead of stalling it in spinning OpenMP barriers. The caller's memory is untouched.
    """
    world_cfg = world_cfg or WorldSection()
    paths = _world_paths(world_cfg, home)
    if _is_complete(paths):
        return paths
    if not isolated:
        return _ensure_world_here(world_cfg, paths, progress)
    _build_in_child(world_cfg, paths.root.parent.parent, progress)
    if not _is_complete(paths):
        raise PreftuneError(
            f"{paths.root}: the demo world build finished but the world is incomplete; delete it and retry"
        )
    return paths


def _ensure_world_here(world_cfg: WorldSection, paths: WorldPaths, progress: bool | None) -> WorldPaths:
    """Build in this process under the per-key lock: temp sibling folder, then one rename."""
    base, key = paths.root.parent, paths.key
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"{base}: cannot create the demo world folder: {err}") from None
    with _build_lock(base / f".{key}.lock"):
        if _is_complete(paths):  # built by another process while we waited
            return paths
        # We hold the lock: any temp folder of this key is from a build that died.
        for stale in base.glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if paths.root.exists():  # not built by us (renames are all-or-nothing): set it aside
            aside = base / f".stale-{key}-{os.getpid()}"
            os.rename(paths.root, aside)
            shutil.rmtree(aside, ignore_errors=True)
        log.info("building the demo world (seed %s) into %s; this takes about a minute", world_cfg.seed, paths.root)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=base))
        except OSError as err:
            raise StorageError(f"{base}: cannot write the demo world: {err}") from None
        try:
            manifest = _build_into(world_cfg, tmp, key, progress)
            os.rename(tmp, paths.root)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"{paths.root}: cannot write the demo world: {err}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("demo world built in %.1f s: %s", manifest["build_seconds"], paths.root)
    return paths


RESULT_PREFIX = "PREFTUNE_WORLD_RESULT "
_ERRORS: dict[str, type[PreftuneError]] = {
    cls.__name__: cls for cls in (PreftuneError, ConfigError, InputError, StorageError)
}


def _build_in_child(world_cfg: WorldSection, home: Path, progress: bool | None) -> None:
    """Run :mod:`preftune.world._worker` and re-raise its user-facing error, if any, here.

    The child's stderr is ours (progress bars, logs); its stdout carries one result line.
    """
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(BUILD_THREADS),
        MKL_NUM_THREADS=str(BUILD_THREADS),
        OMP_WAIT_POLICY="PASSIVE",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [sys.executable, "-m", "preftune.world._worker", "--home", str(home)]
    cmd += ["--config", json.dumps(world_cfg.model_dump(mode="json"))]
    if progress is not None:
        cmd += ["--progress" if progress else "--no-progress"]
    log.info("building the demo world (seed %s) under %s; this takes about a minute", world_cfg.seed, home)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    results = [line[len(RESULT_PREFIX) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(results[-1]) if results else {}
    if proc.returncode == 0 and result.get("ok"):
        return
    if result.get("error"):
        cls = _ERRORS.get(result.get("type", ""), PreftuneError)
        raise cls(result["error"], exit_code=result.get("exit_code"))
    raise PreftuneError(
        f"building the demo world under {home} failed (builder exit code {proc.returncode}); see the messages above"
    )


def _worker_main(argv: list[str] | None = None) -> int:
    """Entry point of the isolated builder (``python -m preftune.world._worker``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="preftune.world._worker", description="Build the preftune demo world.")
    parser.add_argument("--home", required=True)
    parser.add_argument("--config", required=True, help="The world section as JSON.")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    try:
        cfg = WorldSection.model_validate(json.loads(args.config))
        paths = _ensure_world_here(cfg, _world_paths(cfg, args.home), args.progress)
    except PreftuneError as err:
        payload = {"error": err.message, "type": type(err).__name__, "exit_code": err.exit_code}
        print(RESULT_PREFIX + json.dumps(payload), flush=True)
        return err.exit_code or 1
    print(RESULT_PREFIX + json.dumps({"ok": True, "root": str(paths.root)}), flush=True)
    return 0


def resolve_model_ref(ref: str, world_cfg: WorldSection | None = None, home: Path | str | None = None) -> str:
    """``demo:policy`` / ``demo:reward-base`` -> the folder in the (built if needed) demo world;
    any other ref (a folder, an ``s3://`` URI) is returned unchanged."""
    if ref in MODEL_REFS:
        return str(getattr(ensure_world(world_cfg, home), MODEL_REFS[ref]))
    if ref.startswith("demo:"):
        raise ConfigError(f"unknown demo model {ref!r}; expected one of {sorted(MODEL_REFS)}")
    return ref


def resolve_prompts_ref(ref: str, world_cfg: WorldSection | None = None, home: Path | str | None = None) -> str:
    """``demo:prompts`` (train split) / ``demo:prompts-eval`` -> the JSONL file; other refs unchanged."""
    if ref in PROMPT_REFS:
        return str(getattr(ensure_world(world_cfg, home), PROMPT_REFS[ref]))
    if ref.startswith("demo:"):
        raise ConfigError(f"unknown demo prompt set {ref!r}; expected one of {sorted(PROMPT_REFS)}")
    return ref
