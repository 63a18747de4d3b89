"""The run config: one YAML file describes a whole retraining run.

Every field has a default that works on a laptop (local runner, SQLite MLflow, the demo
world), a description (shown by ``preftune config init`` as a comment and published in
the JSON schema by ``preftune config schema``), and is validated at the edge: a bad file
fails with its path, the field path, the line and the reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from preftune.collect.families import FamiliesSection
from preftune.configbase import Section
from preftune.errors import ConfigError
from preftune.evaluate.config import EvaluationSection, PromotionSection
from preftune.fit.config import AuditSection, QualitySection
from preftune.kube.config import KubernetesSection
from preftune.observe.config import ObserveSection
from preftune.pilot.config import PilotSection
from preftune.ppo.config import PPOSection
from preftune.reward.config import RewardSection


class RunSection(Section):
    name: str = Field("preference-retraining", description="Name of the run; used in MLflow run names.")
    seed: int = Field(0, ge=0, description="Seed for every random choice of the run (data splits, sampling, init).")


class ModelsSection(Section):
    policy: str = Field(
        "demo:policy",
        description="The policy to improve: a local folder or s3:// URI saved with save_pretrained, "
        "or 'demo:policy' for the demo world's base policy.",
    )
    reward_base: str = Field(
        "demo:reward-base",
        description="Starting point of the reward model (any architecture; it scores text): a folder, an s3:// URI, "
        "or 'demo:reward-base' for the demo world's small encoder.",
    )
    registered_model: str = Field(
        "preftune-policy", min_length=1, description="Name of the MLflow registered model that holds the champion."
    )


class WorldSection(Section):
    """The demo world: a generated corpus, a locally trained tokenizer and a tiny SFT policy."""

    seed: int = Field(0, ge=0, description="Seed of the demo world; the same seed builds the same world.")
    n_raters: int = Field(5, ge=2, le=50, description="Simulated raters in the panel.")
    rater_noise: float = Field(0.1, ge=0.0, le=1.0, description="Chance that a simulated rater picks at random.")
    contested_share: float = Field(
        0.4,
        gt=0.0,
        lt=1.0,
        description="Share of raters in the minority camp of the contested family (tone and persona).",
    )
    rater_write_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Chance that a careful simulated rater who finds every candidate unacceptable also writes an "
        "acceptable answer (the judgement's 'written' field, annotation tools' rewrite); it is preferred to each "
        "candidate. 0 (the default) writes none. Not part of the world's cache key: the panel, not the world.",
    )
    sft_steps: int = Field(900, ge=1, description="SFT optimisation steps for the base policy.")
    n_layer: int = Field(2, ge=1, description="Transformer blocks of the tiny policy.")
    n_embd: int = Field(96, ge=16, description="Hidden size of the tiny policy.")
    vocab_size: int = Field(
        1024, ge=300, description="Vocabulary size of the locally trained byte-level BPE tokenizer."
    )


class GenerationSection(Section):
    """Sampling of candidate answers by the champion (collect)."""

    n_candidates: int = Field(4, ge=2, le=16, description="Candidates sampled per prompt (best-of-N).")
    temperature: float = Field(1.0, gt=0.0, le=5.0, description="Sampling temperature.")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest token set with this mass."
    )
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Longest candidate, in new tokens.")
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch.")


class ImportOptionsSection(Section):
    """Choices some import formats leave open."""

    pku_axis: Literal["better", "safer"] = Field(
        "better",
        description="PKU-SafeRLHF: which of its two preferences to learn: 'better' (better_response_id, "
        "helpfulness) or 'safer' (safer_response_id).",
    )
    score_field: str = Field(
        "helpfulness",
        min_length=1,
        description="Per-response score files (HelpSteer): the attribute that ranks a prompt's responses.",
    )
    score_pairs: Literal["all", "best_vs_rest"] = Field(
        "all",
        description="Scored or ranked responses (UltraFeedback, HelpSteer): 'all' pairs of different scores, or "
        "the best against each lower-scored one. Either way an item's pairs weigh 1 in total.",
    )

    def options(self):  # -> preftune.data.formats.FormatOptions
        from preftune.data.formats import FormatOptions

        return FormatOptions(pku_axis=self.pku_axis, score_field=self.score_field, score_pairs=self.score_pairs)


class DataSection(Section):
    """Where prompts and judgements come from, and how the preference dataset is built."""

    prompts: str = Field(
        "demo:prompts",
        description="Prompt set: JSONL or Parquet (local path or s3:// URI) with 'prompt' and optional 'id', "
        "'family', 'tags'; or 'demo:prompts' for the demo world's training prompts.",
    )
    judgements: Literal["simulated", "service", "file"] = Field(
        "simulated",
        description="Who judges the candidates: 'simulated' (the demo rater panel), 'service' (an export of the "
        "feedback service) or 'file' (an import of existing preference data).",
    )
    judgements_path: str | None = Field(
        None, description="For 'service' or 'file': the JSONL/Parquet file or s3:// URI to read."
    )
    format: Literal[
        "auto",
        "preftune",
        "best-of-n",
        "trl",
        "ultrafeedback-binarized",
        "ultrafeedback",
        "helpsteer",
        "nectar",
        "shp",
        "pku-saferlhf",
        "openai",
        "hh",
    ] = Field(
        "auto",
        description="Format of judgements_path; 'auto' detects it from the first record (docs/data.md lists each "
        "format's fields).",
    )
    import_options: ImportOptionsSection = Field(default_factory=lambda: ImportOptionsSection())
    extra_prompts: list[str] = Field(
        default_factory=list,
        description="Further prompt files (same format as 'prompts') used whole, after prompt_fraction: e.g. the "
        "hard cases observe wrote (observe/hard_cases.jsonl of its last window).",
    )
    extra_generation: GenerationSection | None = Field(
        None,
        description="Candidate sampling for the prompts of extra_prompts (observe's hard cases are prompts the policy "
        "often answers badly: more candidates, or a higher temperature, make a good answer likelier among them, "
        "so that the raters have something to prefer). Empty: the same as generation.",
    )
    extra_policies: list[str] = Field(
        default_factory=list,
        description="Further policies (folder, s3:// URI, models:/name/version) that sample candidates for the "
        "prompts of extra_prompts beside models.policy; the extra prompts' n_candidates are split between them "
        "(models.policy gets the remainder), so the raters' work per prompt does not grow. For a retraining after "
        "a rejected one: the rejected candidate's answers to the hard cases are where the reward model was wrong "
        "(it rewarded them, the raters would not), so the raters should rank them (online preference "
        "collection, as in iterated RLHF).",
    )
    extra_prompts_repeat: int = Field(
        1,
        ge=1,
        le=50,
        description="Times each prompt of extra_prompts enters the PPO rollout prompts (a few dozen hard cases "
        "among hundreds of prompts: repeats give them weight in the rollouts). Collect judges each prompt once.",
    )
    extra_weight: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="Weight of each judgement of an extra_prompts prompt (matched by its text, also in the feedback "
        "service's export) in the reward model's training, against 1 for every other judgement (its pairs' weights "
        "are multiplied by it; stored in the dataset). A few dozen "
        "observed hard cases beside a kept dataset of a thousand judgements are a few per cent of the reward "
        "model's signal. (On the demo world 4 and 10 did not make the retraining fix its hard cases: "
        "docs/observe.md.)",
    )
    previous_datasets: list[str] = Field(
        default_factory=list,
        description="Published preftune datasets (folder or s3:// URI; e.g. the champion's training data, whose "
        "hash is on its registry version) whose judgements and imported pairs join this run's: judgements cost "
        "raters' time, so a retraining run keeps them and adds the new ones. The split by prompt is made again "
        "over everything; the dataset's metadata lists each previous dataset with its hash.",
    )
    prompt_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="Share of the prompt set to use (a pilot uses a small slice)."
    )
    eval_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of prompts held out for evaluation (split by prompt, never by pair)."
    )
    max_chars: int = Field(4000, ge=16, description="Longer prompt or response texts are truncated (and counted).")
    strict: bool = Field(False, description="Fail on any dropped or repaired record instead of reporting it.")
    generation: GenerationSection = Field(default_factory=GenerationSection)
    families: FamiliesSection = Field(
        default_factory=lambda: FamiliesSection(),
        description="How imported records get their behaviour family: a record field, rules on the prompt, "
        "a classifier folder; unmapped records get 'default' (docs/data.md).",
    )

    @model_validator(mode="after")
    def _extra_policies_have_candidates(self) -> DataSection:
        n = (self.extra_generation or self.generation).n_candidates
        if self.extra_policies and n < 1 + len(self.extra_policies):
            raise ValueError(
                f"data.extra_policies: {len(self.extra_policies)} policies besides models.policy share the extra "
                f"prompts' {n} candidates: at least one each is needed (raise extra_generation.n_candidates)"
            )
        return self


class FitSection(Section):
    """The test of fit: can people reliably pick the better answer, and does the model produce it?"""

    min_alpha: float = Field(
        0.5, ge=-1.0, le=1.0, description="Krippendorff's alpha below which a family is 'contested'."
    )
    min_coverage: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Share of prompts with at least one acceptable candidate below which a family is a "
        "'capability gap' (teach it first with SFT).",
    )
    min_items: int = Field(
        5,
        ge=1,
        description="Fewer multiply-rated items than this: the family is 'not measured' when at least this many "
        "items are rated once (single-rated data), else 'needs data'.",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Level of the bootstrap confidence intervals.")
    bootstrap_resamples: int = Field(1000, ge=100, description="Bootstrap resamples for the confidence intervals.")
    on_unfit: Literal["exclude", "warn", "stop"] = Field(
        "exclude",
        description="What to do with families that are not fit: drop their pairs, keep them with a warning, "
        "or stop the run. The run always stops when no family is fit.",
    )
    accept_unaudited: bool = Field(
        False,
        description="Go on with single-rated data whose agreement was not measured (no audit), recording "
        "unaudited_reason; every downstream run and the registered version are tagged preftune.fit=unaudited.",
    )
    unaudited_reason: str | None = Field(
        None,
        max_length=500,
        description="Why the data is accepted without an agreement audit (required with accept_unaudited).",
    )
    audit: AuditSection = Field(default_factory=lambda: AuditSection())
    quality: QualitySection = Field(default_factory=lambda: QualitySection())

    @model_validator(mode="after")
    def _reason_given(self) -> FitSection:
        if self.accept_unaudited and not (self.unaudited_reason or "").strip():
            raise ValueError("fit.accept_unaudited needs fit.unaudited_reason: say why the data is used unaudited")
        return self


class TrackingSection(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Empty: $MLFLOW_TRACKING_URI, else sqlite:///<preftune home>/mlflow.db.",
    )
    experiment: str = Field("preftune", min_length=1, description="MLflow experiment name.")
    timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for the tracking server before failing.")


class StorageSection(Section):
    root: str | None = Field(
        None,
        description="Where artifacts go: a local folder or s3://bucket/prefix. Empty: <preftune home>/artifacts.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph). Empty: $AWS_ENDPOINT_URL or AWS S3."
    )
    s3_region: str | None = Field(None, description="S3 region. Empty: $AWS_DEFAULT_REGION or us-east-1.")
    max_attempts: int = Field(5, ge=1, le=20, description="Attempts per storage call on transient errors.")


class RunConfig(Section):
    """A whole retraining run."""

    run: RunSection = Field(default_factory=RunSection)
    models: ModelsSection = Field(default_factory=ModelsSection)
    world: WorldSection = Field(default_factory=WorldSection)
    data: DataSection = Field(default_factory=DataSection)
    fit: FitSection = Field(default_factory=FitSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    ppo: PPOSection = Field(default_factory=PPOSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    promotion: PromotionSection = Field(default_factory=PromotionSection)
    pilot: PilotSection = Field(default_factory=PilotSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    kubernetes: KubernetesSection = Field(default_factory=KubernetesSection)
    observe: ObserveSection = Field(default_factory=ObserveSection)

    def config_hash(self) -> str:
        """A short stable hash of the effective config (tagged on every MLflow run)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Loading with errors a user can act on


def _line_of(source: str, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at ``loc``, or of its nearest existing parent."""
    try:
        node = yaml.compose(source)
    except yaml.YAMLError:
        return None
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)]
            if not match:
                key_nodes = [k for k, _ in node.value if k.value == str(key)]
                return key_nodes[0].start_mark.line + 1 if key_nodes else line
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def format_validation_error(err: ValidationError, source_name: str, source: str | None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<top level>"
        where = source_name
        if source is not None:
            line = _line_of(source, loc)
            if line:
                where = f"{source_name}:{line}"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `preftune config schema` lists the fields)"
        lines.append(f"{where}: {path}: {msg}")
    return "invalid run config: " + "; ".join(lines)


def parse_config(data: dict[str, Any] | None, source_name: str = "<config>", source: str | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source_name, source)) from None


def load_config(path: str | Path | None) -> RunConfig:
    """Read and validate a run config; ``None`` gives the defaults."""
    if path is None:
        return RunConfig()
    p = Path(path)
    try:
        source = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: run config not found (create one with `preftune config init {p}`)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: cannot read the run config: {err}") from None
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (run, models, ...), got {type(data).__name__}")
    return parse_config(data, str(p), source)


def json_schema() -> dict[str, Any]:
    schema = RunConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "preftune run config"
    return schema


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _emit(model: type[BaseModel], instance: BaseModel, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for name, field in model.model_fields.items():
        value = getattr(instance, name)
        if field.description:
            for chunk in field.description.split("\n"):
                out.append(f"{pad}# {chunk}")
        if isinstance(value, BaseModel):
            if model.__doc__ is not None and indent == 0 and type(value).__doc__:
                out.append(f"{pad}# {type(value).__doc__.strip().splitlines()[0]}")
            out.append(f"{pad}{name}:")
            _emit(type(value), value, indent + 1, out)
            if indent == 0:
                out.append("")
        elif isinstance(value, (list, dict)) and value:
            dumped = yaml.safe_dump({name: value}, sort_keys=False, default_flow_style=False).rstrip()
            out.extend(pad + line for line in dumped.splitlines())
        else:
            out.append(f"{pad}{name}: {_yaml_scalar(value)}")


def example_yaml() -> str:
    """A commented run config with every field at its default."""
    out = [
        "# preftune run config: every field is optional; the defaults run the demo world locally.",
        "# JSON schema: `preftune config schema`; check a file: `preftune config validate FILE`.",
        "",
    ]
    _emit(RunConfig, RunConfig(), 0, out)
    return "\n".join(out).rstrip() + "\n"
