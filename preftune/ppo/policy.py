"""The actor-critic: one causal LM (policy), its reference and a value head, however they are laid out.

Four layouts, chosen by ``ppo.mode`` x ``ppo.critic``:

================  ==========================================  ==============================================
                  critic = shared                             critic = separate
================  ==========================================  ==============================================
mode = lora       base (frozen, loaded once) + adapter          base + adapter "default" (policy) +
                  "default"; value head on the policy trunk;    adapter "critic" with the value head;
                  reference = adapter disabled                  reference = adapters disabled
mode = full       model (trained) + value head on its trunk;    model + a second trained copy with the value
                  reference = frozen copy                       head; reference = frozen copy
================  ==========================================  ==============================================

A critic-free advantage estimator (``rloo``, ``grpo``, ``reinforce_pp``) builds the actor with
``critic="none"``: no value head is allocated, trained, checkpointed or saved.

Every forward goes through :meth:`ActorCritic.forward`, which returns, for the response positions
only, the logits (``logits_to_keep``: no vocabulary projection over the prompt) and the last hidden
state the value head reads. The rest of the trainer never looks at the layout.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.errors import InputError

POLICY_ADAPTER = "default"
CRITIC_ADAPTER = "critic"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (modules and config)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout", "dropout"):
            if isinstance(getattr(cfg, name, None), float):
                setattr(cfg, name, 0.0)


@dataclass
class ForwardOutput:
    """Per response position t (predicting response token t): logits and the hidden state before it."""

    logits: torch.Tensor | None  # (batch, R, vocab), already divided by the temperature
    hidden: torch.Tensor  # (batch, R, hidden)


class ValueHead(nn.Module):
    """A scalar value per position from the last hidden state (float32 whatever the trunk's dtype)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)  # trick: zero-init value head (no noise in the first advantages)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


def hidden_size_of(model: Any) -> int:
    cfg = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise InputError(f"cannot find the hidden size of {type(model).__name__} (no hidden_size/n_embd/d_model)")


class ActorCritic(nn.Module):
    """Policy, reference and critic over one base model (see the module docstring for the layouts)."""

    def __init__(
        self,
        base: Any,
        *,
        mode: str,
        critic: str,
        temperature: float,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        ref_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("lora", "full") or critic not in ("shared", "separate", "none"):
            raise ValueError(f"unknown layout mode={mode!r} critic={critic!r}")
        self.mode = mode
        self.critic_layout = critic
        self.temperature = float(temperature)
        disable_dropout(base)  # trick: no dropout, so rollout and training log-probs agree
        hidden = hidden_size_of(base)
        self.ref_model: Any = None
        self.critic_model: Any = None
        if mode == "lora":
            from peft import LoraConfig, get_peft_model
            from transformers.pytorch_utils import Conv1D

            targets = lora_target_modules or ["all-linear"]
            lora_cfg = LoraConfig(
                fan_in_fan_out=any(isinstance(m, Conv1D) for m in base.modules()),  # GPT-2 stores linears transposed
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules="all-linear" if targets == ["all-linear"] else list(targets),
                bias="none",
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, lora_cfg, adapter_name=POLICY_ADAPTER)
            if critic == "separate":
                self.model.add_adapter(CRITIC_ADAPTER, copy.deepcopy(lora_cfg))
                self.model.set_adapter(POLICY_ADAPTER)
        else:
            self.model = base
            for p in self.model.parameters():
                p.requires_grad_(True)
            ref = copy.deepcopy(base).eval()  # trick: explicit frozen reference copy (full fine-tuning)
            for p in ref.parameters():
                p.requires_grad_(False)
            # Not registered as a submodule: the reference is neither trained nor checkpointed.
            object.__setattr__(self, "ref_model", ref.to(ref_device) if ref_device is not None else ref)
            if critic == "separate":
                self.critic_model = copy.deepcopy(base)
        # a critic-free run has no value head at all (nothing allocated, trained or saved for it)
        self.value_head: ValueHead | None = ValueHead(hidden) if critic != "none" else None
        self._trainable_names = [n for n, p in self.named_parameters() if p.requires_grad]
        if self.mode == "lora" and self.critic_layout == "separate":
            # peft leaves only the active adapter trainable; both adapters are trained here
            self._trainable_names = [
                n for n, _ in self.named_parameters() if "lora_" in n or n.startswith("value_head.")
            ]
            self._set_trainable()

    # -- parameters ------------------------------------------------------------------------

    def _set_trainable(self) -> None:
        names = set(self._trainable_names)
        for n, p in self.named_parameters():
            if n in names:
                p.requires_grad_(True)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        params = dict(self.named_parameters())
        return [(n, params[n]) for n in self._trainable_names]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copy (on CPU) of every trained tensor: adapters + value head, or all weights in full mode."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trainable_named_parameters()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.trainable_named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise InputError(
                "checkpoint does not match this model layout "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); "
                "resume with the same ppo.mode/critic/lora settings, or start over with --no-resume"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.device, p.dtype))

    def critic_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The critic's own trained parameters: the value head, plus the critic adapter or copy when separate."""
        if self.value_head is None:
            return []
        out = []
        for n, p in self.trainable_named_parameters():
            own = n.startswith("value_head.") or (
                self.critic_layout == "separate"
                and (n.startswith("critic_model.") or f".{CRITIC_ADAPTER}." in n or n.endswith(f".{CRITIC_ADAPTER}"))
            )
            if own:
                out.append((n, p))
        return out

    def critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
        """Values with gradients for the critic only (critic warm-up): a shared critic's trunk is the policy's,
        so it runs without gradient and only the value head learns."""
        if self.value_head is None:
            raise RuntimeError("this actor has no critic")
        if self.critic_layout == "separate":
            return self.critic_forward(input_ids, attention_mask, n_response)
        with torch.no_grad():  # trick: critic warm-up leaves the policy (its trunk) frozen
            out = self._run(self.model, input_ids, attention_mask, n_response, with_logits=False)
        return self.value_head(out.hidden.detach())

    def n_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable_named_parameters())

    def gradient_checkpointing_enable(self) -> None:
        for m in (self.model, self.critic_model):
            if m is None:
                continue
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.mode == "lora" and hasattr(m, "enable_input_require_grads"):
                m.enable_input_require_grads()  # checkpointed blocks need an input that requires grad

    # -- forwards --------------------------------------------------------------------------

    @property
    def policy_lm(self) -> Any:
        """The module that samples (the peft wrapper in lora mode)."""
        return self.model

    @contextlib.contextmanager
    def _adapter(self, name: str) -> Iterator[None]:
        """Make one LoRA adapter active for the duration (lora + separate critic)."""
        self.model.set_adapter(name)
        try:
            yield
        finally:
            self.model.set_adapter(POLICY_ADAPTER)
            self._set_trainable()

    def _run(
        self, lm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int, with_logits: bool
    ) -> ForwardOutput:
        out = lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=n_response + 1 if with_logits else 1,  # no vocabulary projection over the prompt
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = out.hidden_states[-1][:, -(n_response + 1) : -1]
        logits = out.logits[:, :-1] / self.temperature if with_logits else None  # trick: temperature in training too
        return ForwardOutput(logits=logits, hidden=hidden)

    def policy_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits over the response positions, values when the critic shares the trunk else None)."""
        out = self._run(self.model, input_ids, attention_mask, n_response, with_logits=True)
        values = self.value_head(out.hidden) if self.critic_layout == "shared" and self.value_head else None
        return out.logits, values  # type: ignore[return-value]

    def critic_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
        """Values from the separate critic trunk."""
        if self.critic_layout != "separate" or self.value_head is None:
            raise RuntimeError("critic_forward is for critic='separate'; the shared critic comes with policy_forward")
        if self.mode == "lora":
            with self._adapter(CRITIC_ADAPTER):
                out = self._run(self.model, input_ids, attention_mask, n_response, with_logits=False)
        else:
            out = self._run(self.critic_model, input_ids, attention_mask, n_response, with_logits=False)
        return self.value_head(out.hidden)

    @torch.no_grad()
    def ref_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
        """Reference logits: the same base with the adapter disabled (lora), or the frozen copy (full)."""
        if self.mode == "lora":
            with self.model.disable_adapter():  # trick: reference = base with the adapter off (no second copy)
                out = self._run(self.model, input_ids, attention_mask, n_response, with_logits=True)
            return out.logits  # type: ignore[return-value]
        ref_dev = next(self.ref_model.parameters()).device
        out = self._run(self.ref_model, input_ids.to(ref_dev), attention_mask.to(ref_dev), n_response, with_logits=True)
        return out.logits.to(input_ids.device)  # type: ignore[union-attr]

    # -- saving ----------------------------------------------------------------------------

    def save_policy(self, out_dir: Path, tokenizer: Any, *, merged: bool) -> dict[str, str | None]:
        """Write the trained policy into ``out_dir``; returns where the weights went.

        full mode, or lora with ``merged``: the whole model at the top (plain ``from_pretrained``),
        and in lora mode the adapter in ``adapter/``. lora without ``merged``: the adapter at the top
        (a peft adapter folder whose ``base_model_name_or_path`` is the local base).
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        written: dict[str, str | None] = {"adapter": None, "merged": None}
        if self.mode == "lora":
            adapter_dir = out_dir / "adapter" if merged else out_dir
            self.model.save_pretrained(str(adapter_dir), selected_adapters=[POLICY_ADAPTER])
            tokenizer.save_pretrained(str(adapter_dir))
            written["adapter"] = "adapter" if merged else "."
            if merged:
                # merge into a copy: the live model keeps its adapter (and the reference) intact
                lm = copy.deepcopy(self.model)
                if self.critic_layout == "separate":
                    lm.delete_adapter(CRITIC_ADAPTER)
                merged_model = lm.merge_and_unload()
                merged_model.save_pretrained(str(out_dir))
                tokenizer.save_pretrained(str(out_dir))
                written["merged"] = "."
        else:
            self.model.save_pretrained(str(out_dir))
            tokenizer.save_pretrained(str(out_dir))
            written["merged"] = "."
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), out_dir / "value_head.pt")
        return written


# ---------------------------------------------------------------------------------------------
# Where the critic starts


def _trunk(model: Any) -> Any:
    return getattr(model, model.base_model_prefix)


def reward_model_fits_critic(actor: ActorCritic, reward_model: Any, policy_tok: Any, reward_tok: Any) -> str | None:
    """Why the reward model cannot be copied into ``actor``'s critic (None: it can).

    The copy needs a critic with a trunk of its own that is a full model (``mode: full``, ``critic:
    separate``), a reward model of the policy's architecture and size (same ``model_type`` and trunk
    parameter shapes) and the same vocabulary (the critic reads the policy's token ids).
    """
    if actor.mode != "full" or actor.critic_layout != "separate" or actor.critic_model is None:
        return (
            f"the critic shares the policy's trunk (mode: {actor.mode}, critic: {actor.critic_layout}); only a "
            "separate full critic can start as the reward model"
        )
    if reward_model.config.model_type != actor.critic_model.config.model_type:
        return (
            f"the reward model is a {reward_model.config.model_type}, the policy a "
            f"{actor.critic_model.config.model_type}"
        )
    ours = {k: tuple(v.shape) for k, v in _trunk(actor.critic_model).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in _trunk(reward_model).state_dict().items()}
    if ours != theirs:
        return "the reward model's trunk has other parameter names or shapes than the policy's"
    if policy_tok.get_vocab() != reward_tok.get_vocab():
        return "the reward model has its own tokenizer (the critic reads the policy's token ids)"
    head = getattr(reward_model, "score", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        return "the reward model has no one-output linear 'score' head"
    return None


@torch.no_grad()
def init_critic_from_reward_model(
    actor: ActorCritic, reward_model: Any, reward_stats: tuple[float, float] | None = None
) -> None:
    """Copy the reward model's trunk into the critic and its score head into the value head (TRL's start).

    With ``reward_stats`` (mean, std: the rewards PPO sees are normalised with them) the head is
    rescaled so that the critic's first values are on the normalised scale: v = (score - mean) / std.
    Check :func:`reward_model_fits_critic` first.
    """
    assert actor.critic_model is not None and actor.value_head is not None
    _trunk(actor.critic_model).load_state_dict(_trunk(reward_model).state_dict())
    head = reward_model.score
    mean, std = reward_stats if reward_stats is not None else (0.0, 1.0)
    summary = actor.value_head.summary
    summary.weight.copy_(head.weight.float() / std)  # trick: critic starts as the reward model (TRL)
    bias = head.bias.float() if head.bias is not None else torch.zeros(1)
    summary.bias.copy_((bias - mean) / std)


def start_critic(
    actor: ActorCritic,
    how: str,
    reward_model: Any,
    policy_tok: Any,
    reward_tok: Any,
    reward_stats: tuple[float, float] | None = None,
) -> str:
    """Start the critic as ``ppo.critic_init`` says; returns what was done: 'reward_model', 'zero' or 'none'.

    'auto' copies the reward model when :func:`reward_model_fits_critic` allows it, else keeps the
    zero-initialised value head; 'reward_model' raises :class:`~preftune.errors.ConfigError` when it
    cannot be done.
    """
    from preftune.errors import ConfigError

    if actor.value_head is None:
        return "none"
    if how == "zero":
        return "zero"
    why = reward_model_fits_critic(actor, reward_model, policy_tok, reward_tok)
    if why is None:
        init_critic_from_reward_model(actor, reward_model, reward_stats)
        return "reward_model"
    if how == "reward_model":
        raise ConfigError(f"ppo.critic_init: reward_model cannot be used: {why}; use 'auto' or 'zero'")
    return "zero"
