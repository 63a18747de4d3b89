"""Plots people would rather look at than read; saved as PNG for MLflow and reports."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def behaviour_shares_png(
    shares: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: str | Path,
    title: str = "Behaviour shares",
    preferred: Mapping[str, str | None] | None = None,
) -> Path:
    """Grouped bars: one panel per family, one bar group per behaviour, one bar per model.

    ``shares`` maps a model label ("base", "candidate", ...) to ``{family: {behaviour: share}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(shares)
    families = sorted({f for s in shares.values() for f in s})
    fig, axes = plt.subplots(1, len(families), figsize=(3.6 * len(families), 3.4), squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, family in zip(axes[0], families, strict=True):
        behaviours = sorted({b for s in shares.values() for b in s.get(family, {})})
        for i, label in enumerate(labels):
            vals = [shares[label].get(family, {}).get(b, 0.0) for b in behaviours]
            xs = [x + i * width for x in range(len(behaviours))]
            ax.bar(xs, vals, width=width, label=label)
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(behaviours))])
        pref = (preferred or {}).get(family)
        ax.set_xticklabels([f"{b}*" if b == pref else b for b in behaviours], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(family)
    axes[0][0].set_ylabel("share of samples")
    if len(labels) > 1:
        axes[0][-1].legend(fontsize=8)
    fig.suptitle(title + ("   (* = rubric-preferred)" if preferred else ""))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
