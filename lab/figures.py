"""What both lab reports share: number formatting for their tables and the ROC / histogram figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lab.evaluate import roc_curve


def fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def pct(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{100 * value:.1f}%"


def roc_figure(plt, scores: dict[str, dict[str, np.ndarray]], title: str, path: Path) -> None:  # noqa: ANN001
    """One ROC curve per method (clean test vs triggered test), FPR on a log-like axis."""
    fig, ax = plt.subplots(figsize=(3.6, 3.4), dpi=80)
    for method, splits in sorted(scores.items()):
        fpr, tpr = roc_curve(splits["clean"], splits["triggered"])
        ax.plot(fpr, tpr, label=method, lw=1.2)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="FPR (clean CIFAR-10 test)", ylabel="TPR (triggered)", title=title)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def score_histogram(
    plt,  # noqa: ANN001
    splits: dict[str, np.ndarray],
    threshold: float,
    method: str,
    title: str,
    path: Path,
) -> None:
    """Clean vs triggered test scores of one method, with the clean-calibrated threshold."""
    fig, ax = plt.subplots(figsize=(3.6, 2.6), dpi=80)
    both = np.concatenate([splits["clean"], splits["triggered"]])
    bins = np.linspace(both.min(), np.quantile(both, 0.999), 60)
    ax.hist(splits["clean"], bins, alpha=0.6, density=True, label="clean test")
    ax.hist(splits["triggered"], bins, alpha=0.6, density=True, label="triggered test")
    ax.axvline(threshold, color="k", ls="--", lw=1, label="calibrated threshold")
    ax.set(xlabel=f"{method} score", title=title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report_files(out_dir: Path, results: dict, markdown: str) -> None:
    """What every lab report writes: results.json (every figure) and REPORT.md beside it."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out_dir / "REPORT.md").write_text(markdown)
