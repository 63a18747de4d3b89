"""The ``ppo`` section of the run config.

Every PPO knob lives here, typed and bounded, so that the trainer holds no magic numbers: each
trick of "The N Implementation Details of RLHF with PPO" (Huang et al., 2024) and of Ziegler et
al. (2019) that the trainer applies is one field below, with the default that makes the demo
world reach its efficacy figures on 2 CPU cores (see ``docs/ppo.md``).

:class:`PPOSection` is over 300 lines on purpose: it is a flat list of field declarations, each
with its bound and description (the generated schema and the docs read them), plus the
validators that tie fields together; splitting it into sub-sections would change the config
file's shape (``ppo.*`` keys) that users, the pipeline and the checkpoint fingerprint rely on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from preftune.configbase import Section


class PPOSection(Section):
    """PPO against the reward model with a KL leash to the reference."""

    # -- what is trained --------------------------------------------------------------------
    mode: Literal["lora", "full"] = Field(
        "lora",
        description="'lora': the frozen base is loaded once; the policy is a LoRA adapter and the reference is the "
        "same model with the adapter disabled. 'full': every weight is trained; the reference is a frozen copy.",
    )
    critic: Literal["shared", "separate"] = Field(
        "shared",
        description="'shared': the value head sits on the policy's trunk (one forward gives log-probs and values). "
        "'separate': the value head has its own trunk (a second LoRA adapter on the same base in lora mode, a "
        "second copy of the model in full mode).",
    )
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank of the policy (and critic) adapter.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="LoRA dropout (0 keeps log-probs exact across passes)."
    )
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="Modules that get LoRA: ['all-linear'] (every linear layer but the output head) or module names.",
    )
    ref_offload: bool = Field(
        False, description="Full mode on GPU: keep the frozen reference copy on the CPU (slower, saves GPU memory)."
    )

    # -- prompts ----------------------------------------------------------------------------
    prompts: str | None = Field(
        None,
        description="Prompts to roll out on: JSONL (local or s3://) with 'prompt' and optional 'id', 'family'; or "
        "'demo:prompts' (the demo world's training prompts). Empty: data.prompts.",
    )
    exclude_families: list[str] = Field(
        default_factory=list,
        description="Prompt families left out of PPO, in addition to those the reward model does not cover.",
    )
    reward_model_families_only: bool = Field(
        True,
        description="Roll out only on families the reward model was evaluated on (its per-family accuracy in "
        "reward_model.json): families check-fit excluded (contested, capability gap) never reach PPO.",
    )
    balance_families: bool = Field(
        True,
        description="Draw the same number of prompts from every family into each rollout batch (a small family "
        "is revisited more often) instead of in proportion to the families' sizes.",
    )
    max_prompt_tokens: int = Field(
        192, ge=1, description="Longer rendered prompts lose their beginning (the 'Assistant:' cue is kept)."
    )

    # -- budget and batches -----------------------------------------------------------------
    updates: int = Field(80, ge=1, description="PPO iterations: each is one rollout batch and its PPO epochs.")
    batch_size: int = Field(64, ge=1, description="Prompts (= sampled responses) per rollout.")
    mini_batch_size: int = Field(16, ge=1, description="Responses per optimiser step (divides batch_size).")
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches accumulated per optimiser step (divides mini_batch_size)."
    )
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch, in freshly shuffled mini-batches.")
    logprobs_from_sampling: bool = Field(
        True,
        description="Take the rollout policy's log-probs, entropy and (shared-critic) values from the sampling pass "
        "itself instead of a second forward over prompt + response (same numbers up to float rounding, one pass "
        "fewer). false: recompute them with a full forward, as TRL does.",
    )
    forward_batch_size: int = Field(
        64, ge=1, description="Rows per no-grad forward when scoring a rollout (log-probs, values, reference)."
    )

    # -- sampling ---------------------------------------------------------------------------
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Longest response, in new tokens.")
    temperature: float = Field(
        1.0, gt=0.0, le=5.0, description="Sampling temperature (applied to the training log-probs as well)."
    )

    # -- rollout engine (preftune.ppo.engine) -------------------------------------------------
    rollout_early_exit: bool = Field(
        False,
        description="Drop a row from the decode batch once it has emitted EOS: fewer forward rows, the same "
        "sampled tokens and random stream; log-probs and values agree to float rounding (~1e-6), not bit for bit.",
    )
    rollout_share_prefill: bool = Field(
        True,
        description="With samples_per_prompt k > 1: one prefill per prompt, its KV cache copied k times (the same "
        "tokens as k prefills when forward_batch_size is a multiple of k; log-probs to float rounding, ~1e-6).",
    )
    rollout_merge_lora: bool = Field(
        False,
        description="mode lora: fold the adapter into the base weights for the rollout (no per-token adapter cost); "
        "the update runs the adapter as usual. Sampled tokens and old log-probs then agree with the unmerged "
        "policy to float rounding (~1e-6), not bit for bit.",
    )
    rollout_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Precision of the rollout's forwards: bf16 autocast (CPU with avx512_bf16/AMX, or GPU) for the "
        "sampling pass only; old log-probs then differ from the fp32 update's by up to ~0.1 nats per token."
        " fp32: exact.",
    )

    rollout_length_batching: bool = Field(
        False,
        description="When a rollout takes several forward chunks (batch_size > forward_batch_size): group the "
        "prompts by length, longest first, and cut each chunk's left padding to its longest prompt (less prefill "
        "and attention work on pads). The rows come back in order; the chunks draw from the random stream in the "
        "new order, so the samples are another seeded draw. With one chunk (the default sizes) it changes nothing.",
    )
    rollout_share_prefix: int = Field(
        0,
        ge=0,
        le=4096,
        description="0: off. n: when every prompt of a forward chunk starts with the same n or more tokens (a chat "
        "template's system text), prefill them once and copy their KV cache to every row; each row's own tokens "
        "follow. The same random draws; log-probs to float rounding (~1e-6).",
    )
    rollout_compile: bool = Field(
        False,
        description="Decode on a static KV cache with the one-token decode step compiled by torch.compile (the "
        "prefill stays eager); falls back to the same static-cache step run eagerly, logged once, where compiling "
        "is unavailable or fails. The same sampled tokens; log-probs to float rounding (~1e-6). Compiling costs "
        "tens of seconds once per process and shape; not combinable with rollout_early_exit.",
    )
    rollout_compile_bucket: int = Field(
        64,
        ge=1,
        le=4096,
        description="rollout_compile: the static cache holds prompt + max_new_tokens positions rounded up to a "
        "multiple of this, so prompt batches of nearby lengths reuse one compiled graph (larger: fewer recompiles, "
        "more masked attention work per step).",
    )

    # -- reward -----------------------------------------------------------------------------
    reward_normalize: bool = Field(
        True, description="Standardise rewards with the mean and std that train-reward saved in reward_model.json."
    )
    reward_clip: float | None = Field(
        5.0, gt=0.0, description="Clip (normalised) rewards to [-reward_clip, reward_clip]; empty: no clipping."
    )
    missing_eos_penalty: float | None = Field(
        1.0,
        ge=0.0,
        description="Subtracted from the reward of a response that hits max_new_tokens without EOS; empty: none.",
    )
    reward_batch_size: int = Field(64, ge=1, description="Texts per reward-model forward.")

    # -- KL leash ---------------------------------------------------------------------------
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1",
        description="Per-token KL estimator in the reward (Schulman's k1 = log p/q, k2 = (log p/q)^2/2, "
        "k3 = (q/p - 1) - log q/p; k1 is unbiased per sequence, k3 never negative).",
    )
    kl_controller: Literal["fixed", "adaptive"] = Field(
        "adaptive", description="'fixed' keeps kl_coef; 'adaptive' steers the sequence KL towards kl_target (Ziegler)."
    )
    kl_coef: float = Field(0.1, ge=0.0, description="(Initial) coefficient of the per-token KL penalty.")
    kl_target: float = Field(
        2.0, gt=0.0, description="Adaptive controller: target KL to the reference, nats per response."
    )
    kl_controller_step: Literal["linear", "log", "log_pd"] = Field(
        "linear",
        description="Adaptive controller's step: 'linear' (Ziegler; TRL, verl): beta *= 1 + e * batch_size / "
        "kl_horizon; 'log': beta *= exp(e * batch_size / kl_horizon), as fast down as up and never negative "
        "(e = the clipped proportional error); 'log_pd': the log step with a derivative term, beta *= exp(clip(e "
        "+ kl_damping x change of the exponential average of log(KL/target) (kl_damping_smoothing) since the last "
        "update) x batch_size / kl_horizon).",
    )
    kl_damping: float = Field(
        2.0,
        ge=0.0,
        description="With kl_controller_step 'log_pd': gain of the derivative term on the (smoothed) log error per "
        "update. Beta holds while the KL approaches the target by a factor e^(kl_error_clip / kl_damping) or more "
        "per update (x1.105 at 0.2 / 2); 0: the 'log' step.",
    )
    kl_damping_smoothing: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="With kl_controller_step 'log_pd': weight of the newest update in the exponential average of the "
        "log error that the derivative term differentiates (one batch's KL is noisy, and a derivative amplifies "
        "noise). 1: the raw log error.",
    )
    kl_horizon: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        2000,
        description="Adaptive controller: responses over which the coefficient may change by e^error. 'auto': the "
        "run's responses (updates x batch_size) / kl_horizons_per_run, so that the coefficient's reach follows the "
        "run's length.",
    )
    kl_horizons_per_run: float = Field(
        20.0,
        gt=0.0,
        description="With kl_horizon 'auto': horizons in one run. With kl_controller_step 'log' the coefficient can "
        "move by up to e^(kl_error_clip x this) over the run, either way (e^4 = x55 at 0.2 x 20).",
    )
    kl_target_ramp: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Adaptive controller: share of the run's updates over which its target rises linearly from 0 to "
        "kl_target. The policy starts at the reference, so its first KLs are near 0 whatever the coefficient: "
        "against the full target they only drive the coefficient down. 0: the full target from the first update.",
    )
    kl_error_clip: float = Field(
        0.2, gt=0.0, le=1.0, description="Adaptive controller: clip of the proportional error (Ziegler et al. use 0.2)."
    )
    kl_budget: float = Field(
        6.0,
        gt=0.0,
        description="KL to the reference (nats per response) the trained policy must stay within; the final "
        "figure is reported against it (PPOResult.kl_within_budget).",
    )
    kl_hard_limit: float = Field(
        30.0,
        gt=0.0,
        description="Divergence guard: a rollout whose mean KL exceeds this stops the run (exit code 12), keeping "
        "the last good checkpoint.",
    )

    # -- drift guards (preftune.ppo.drift) --------------------------------------------------
    max_minutes: float | None = Field(
        None,
        gt=0.0,
        description="Time budget: stop cleanly (with a checkpoint) after the update during which this many minutes "
        "of training passed, even before 'updates'; empty: no time limit. The pilot uses it.",
    )
    length_drift_guard: Literal["off", "warn", "stop"] = Field(
        "warn",
        description="Mean response length moving more than max_length_drift from its start: log a warning, or "
        "stop the run (exit code 12, last good checkpoint kept).",
    )
    max_length_drift: float = Field(
        0.5, gt=0.0, description="Length-drift limit: relative change of the mean response length (0.5 = +-50%)."
    )
    repetition_drift_guard: Literal["off", "warn", "stop"] = Field(
        "warn",
        description="Share of repeated n-grams within responses rising by more than max_repetition_rise: warn or stop.",
    )
    max_repetition_rise: float = Field(
        0.15, gt=0.0, le=1.0, description="Repetition-drift limit: absolute rise of the repeated n-gram share."
    )
    repetition_ngram: int = Field(3, ge=1, description="n of the n-grams counted as repetition (response tokens).")
    reward_divergence_guard: Literal["off", "warn", "stop"] = Field(
        "off",
        description="Reward rising while the evaluation suite's judge, applied to the same rollout responses, does "
        "not see more of the preferred behaviour (reward hacking): warn or stop. Needs a suite that judges the "
        "rollout families (evaluation.suite); costs one judge call per rollout.",
    )
    divergence_min_reward_rise: float = Field(
        0.5, gt=0.0, description="Divergence guard: rise of the mean (normalised) reward that counts as 'reward up'."
    )
    divergence_min_judged_rise: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Divergence guard: the judged preferred share must rise at least this much along with the reward.",
    )
    drift_window: int = Field(
        3, ge=1, description="Drift guards compare the mean of the first this-many updates with the last this-many."
    )

    # -- advantages and losses --------------------------------------------------------------
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount factor of GAE.")
    lam: float = Field(
        0.95,
        ge=0.0,
        le=1.0,
        description="GAE lambda (bias/variance trade-off of advantages). The value head starts untrained, so early "
        "on a lambda below 1 hides the end-of-response reward from early tokens (0.95^48 = 0.09): 0.99 learns more "
        "reward per nat of KL (docs/benchmarks.md, frontier) but let more unsafe answers through on the demo suite.",
    )
    advantage_estimator: Literal["gae", "rloo", "grpo", "reinforce_pp"] = Field(
        "gae",
        description="How advantages are estimated (preftune.ppo.estimators): 'gae' (a critic, gamma and lam); "
        "critic-free, no value head allocated or trained: 'rloo' (leave-one-out baseline over samples_per_prompt "
        "responses to the same prompt), 'grpo' (return standardised within those responses), 'reinforce_pp' "
        "(REINFORCE++: per-token reward-to-go, standardised over the batch). The KL penalty is in the reward for all.",
    )
    samples_per_prompt: int = Field(
        1,
        ge=1,
        le=64,
        description="Responses sampled per prompt in a rollout (the prompt stream repeats each prompt this many "
        "times; batch_size counts responses and must be a multiple). At least 2 for rloo and grpo.",
    )
    critic_init: Literal["auto", "reward_model", "zero"] = Field(
        "auto",
        description="Start of the critic (gae): 'reward_model' copies the reward model's trunk and score head into "
        "the critic (TRL's start; needs critic: separate, mode: full, and a reward model of the policy's "
        "architecture and vocabulary), 'zero' a zero value head on the policy trunk, 'auto' the first when the "
        "architectures allow it, else the second. critic_warmup_updates applies after either.",
    )
    critic_warmup_updates: int = Field(
        0,
        ge=0,
        le=100,
        description="Critic-only updates on the first rollouts before PPO starts (gae): the policy is frozen and "
        "only the critic (value head, and the critic adapter or copy of a separate critic) learns the returns, so "
        "the first advantages are not computed against a zero value. They do not count in 'updates'.",
    )
    whiten_advantages: bool = Field(
        True,
        description="gae: standardise advantages over the valid tokens of the whole rollout batch (before the "
        "epochs). The critic-free estimators normalise in their own way (grpo per group, reinforce_pp per batch, "
        "rloo not at all).",
    )
    whiten_rewards: bool = Field(False, description="Scale per-token rewards to unit variance before GAE.")
    clip_range: float = Field(0.2, gt=0.0, lt=1.0, description="PPO ratio clip epsilon of the policy loss.")
    clip_range_value: float = Field(
        0.2, gt=0.0, description="Value clip: new values stay within this of the rollout's values."
    )
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.0, ge=0.0, description="Weight of the entropy bonus (0: off).")
    demonstration_coef: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the demonstration term (InstructGPT's PPO-ptx, on the raters' own answers): each "
        "PPO micro-step also adds this times the mean per-token negative log-likelihood of "
        "demonstration_batch_size answers the raters wrote where no candidate was acceptable (the 'written' "
        "field of the run's judgements). PPO reinforces only what the policy samples; a demonstration "
        "teaches an answer it does not sample yet. 0: off; on, a run without written answers says so and "
        "trains without the term.",
    )
    demonstration_batch_size: int = Field(
        8, ge=1, le=1024, description="Written answers in each micro-step's demonstration term."
    )
    approx_kl_stop: float | None = Field(
        0.1,
        gt=0.0,
        description="Stop the remaining PPO epochs of an update once the approximate KL between the new and the "
        "rollout policy exceeds this; empty: never.",
    )

    # -- optimiser --------------------------------------------------------------------------
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate (AdamW).")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="Decay after warm-up, per update, down to min_lr_ratio * lr."
    )
    warmup_updates: int = Field(2, ge=0, description="Updates of linear learning-rate warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final learning rate as a share of lr.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Clip the global gradient norm to this.")
    value_head_lr_ratio: float = Field(1.0, gt=0.0, description="Learning rate of the value head as a multiple of lr.")

    # -- hardware ---------------------------------------------------------------------------
    device: str | None = Field(
        None, description="'cpu', 'cuda' or 'cuda:N'. Empty: $PREFTUNE_DEVICE, else a GPU when visible, else CPU."
    )
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto",
        description="Autocast of the update's forwards and the rollout's scoring forwards: 'auto' = bf16 on a GPU "
        "that supports it, fp32 on CPU; 'bf16' = bf16 on any device (CPUs with avx512_bf16 or AMX run it fast, "
        "others slowly); 'no' = fp32 everywhere. Weights, gradients and the optimiser state stay fp32.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, about 30% more time)."
    )
    deepspeed_config: str | None = Field(
        None,
        description="DeepSpeed config file (JSON; ZeRO stage 0, 1 or 2 in zero_optimization): the trainable parameters "
        "and the AdamW optimiser go through deepspeed.initialize (the gpu extra). Batch fields may be left out or "
        "'auto' (filled from batch_size, mini_batch_size, grad_accum_steps and the process count) or must agree; "
        "gradient_clipping likewise with max_grad_norm. Empty: plain PyTorch.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch. Empty: automatic on CPU -- one thread per params_per_thread trainable "
        "model parameters, at least 1, at most torch's default (tiny models run fastest on one thread).",
    )
    params_per_thread: int = Field(
        20_000_000,
        ge=1,
        description="Automatic thread count: policy parameters per CPU thread (GEMMs smaller than this lose more "
        "to thread synchronisation than they gain).",
    )
    deterministic: bool = Field(
        True, description="torch.use_deterministic_algorithms (warn-only): same seed, same run, resumable exactly."
    )

    # -- reliability ------------------------------------------------------------------------
    checkpoint_every: int = Field(10, ge=1, description="Updates between checkpoints (and one at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    checkpoint_dir: str | None = Field(
        None,
        description="Where checkpoints go (local path or s3://). Empty: '<output>.checkpoints' next to the output.",
    )

    # -- outputs and observability ----------------------------------------------------------
    save_merged: bool = Field(
        True,
        description="Save the policy with the adapter merged in at the top of the output (loadable with plain "
        "from_pretrained); the adapter is always saved in 'adapter/'.",
    )
    samples_every: int = Field(10, ge=1, description="Updates between tables of sample generations in MLflow.")
    samples_per_table: int = Field(16, ge=1, description="Generations (with rewards) per sample table.")
    log_model: bool = Field(True, description="Log the trained policy to MLflow as a model with a signature.")
    pushgateway_url: str | None = Field(
        None, description="Prometheus Pushgateway (host:port or URL): key gauges are pushed after every update."
    )
    pushgateway_job: str = Field("preftune-ppo", min_length=1, description="Pushgateway job label.")
    progress: bool = Field(True, description="Show a progress bar with ETA and the live reward and KL.")

    @model_validator(mode="after")
    def _batches_divide(self) -> PPOSection:
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must divide batch_size ({self.batch_size})")
        if self.mini_batch_size % self.grad_accum_steps:
            raise ValueError(
                f"grad_accum_steps ({self.grad_accum_steps}) must divide mini_batch_size ({self.mini_batch_size})"
            )
        from preftune.ppo.estimators import get

        need = get(self.advantage_estimator).min_samples_per_prompt
        if self.samples_per_prompt < need:
            raise ValueError(
                f"advantage_estimator {self.advantage_estimator!r} compares responses to the same prompt: "
                f"samples_per_prompt must be at least {need} (it is {self.samples_per_prompt})"
            )
        if self.critic_init == "reward_model" and (self.mode, self.critic) != ("full", "separate"):
            raise ValueError(
                "critic_init 'reward_model' copies the reward model into a critic of its own: it needs mode: full "
                f"and critic: separate (this run has mode: {self.mode}, critic: {self.critic}); use 'auto' or 'zero' "
                "with critic_warmup_updates"
            )
        if self.rollout_compile and self.rollout_early_exit:
            raise ValueError(
                "rollout_compile decodes on a static KV cache, whose rows cannot leave the batch: turn off "
                "rollout_early_exit or rollout_compile"
            )
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"samples_per_prompt ({self.samples_per_prompt}) must divide batch_size ({self.batch_size}): "
                "a rollout holds whole groups of responses to the same prompt"
            )
        return self
