"""PPO fine-tuning of the policy against the reward model (keep this module free of heavy imports)."""
