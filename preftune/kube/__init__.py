"""Kubernetes settings of a run: images, resources, GPUs, secrets (no kfp import here)."""
