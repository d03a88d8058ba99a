"""Diagnostic figures a trial logs to MLflow.

Figures are built with ``matplotlib.figure.Figure`` directly rather than pyplot: pyplot keeps a global registry of
open figures and picks a GUI backend, both of which leak memory or fail inside headless Ray workers. A bare
``Figure`` needs no backend; ``savefig`` renders it with Agg on demand.
"""

from __future__ import annotations

from collections.abc import Mapping

from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from bgad_core.errors import DataError


def anomaly_map_overlays(
    images: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray | None,
    scores: np.ndarray,
    labels: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """One row per image: the image, then the anomaly map over it with the ground-truth contour (if any).

    All maps share one colour scale (default: 1st/99th percentile over all maps) so that a hot region in one row
    means the same score as in another; per-image scaling would make every normal image look anomalous.
    """
    count = len(images)
    if images.ndim != 4 or maps.shape != images.shape[:3] or len(scores) != count or len(labels) != count:
        raise DataError(
            f"anomaly_map_overlays: images {images.shape}, maps {maps.shape}, scores {np.shape(scores)}, "
            f"labels {np.shape(labels)} disagree (want [N,H,W,3], [N,H,W], [N], [N])"
        )
    if masks is not None and masks.shape != maps.shape:
        raise DataError(f"anomaly_map_overlays: masks {masks.shape} do not match maps {maps.shape}")
    low, high = np.percentile(maps, [1, 99]) if count else (0.0, 1.0)
    norm = Normalize(vmin=low if vmin is None else vmin, vmax=high if vmax is None else vmax)
    fig = Figure(figsize=(6.5, 3.0 * max(count, 1)), layout="constrained")
    axes = fig.subplots(max(count, 1), 2, squeeze=False)
    for row, (image_ax, map_ax) in enumerate(axes[:count]):
        image_ax.imshow(images[row])
        image_ax.set_title(f"label {int(labels[row])}  score {float(scores[row]):.4g}", fontsize=9)
        map_ax.imshow(images[row])
        map_ax.imshow(maps[row], cmap="jet", norm=norm, alpha=0.5)
        if masks is not None and 0 < masks[row].max() and masks[row].min() == 0:
            map_ax.contour(masks[row], levels=[0.5], colors="white", linewidths=1.0)
        map_ax.set_title("anomaly map" + (" + ground truth" if masks is not None else ""), fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=norm, cmap="jet"), ax=axes[:, 1].tolist(), shrink=0.8, label="anomaly score")
    return fig


def score_histogram(
    normal_values: np.ndarray, abnormal_values: np.ndarray, boundaries: Mapping[str, float], label: str
) -> Figure:
    """Density histograms of a family's training values (``Training.score_distribution``) with its boundaries.

    BGAD's boundary loss pushes normal per-dimension log-likelihoods above b_n and abnormal ones below b_a; seeing
    both distributions against the boundaries on shared bins shows at a glance whether the margin is being learnt.
    Non-finite values (a diverging flow) are dropped so that they cannot break the binning.
    """
    normal = np.asarray(normal_values, dtype=np.float64).ravel()
    abnormal = np.asarray(abnormal_values, dtype=np.float64).ravel()
    normal, abnormal = normal[np.isfinite(normal)], abnormal[np.isfinite(abnormal)]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    both = np.concatenate([normal, abnormal])
    if both.size:
        bins = np.histogram_bin_edges(both, bins=50)
        for values, name, colour in ((normal, "normal", "tab:blue"), (abnormal, "abnormal", "tab:red")):
            if values.size:
                ax.hist(values, bins=bins, density=True, alpha=0.5, color=colour, label=f"{name} (n={values.size})")
    for (name, value), style in zip(boundaries.items(), (("tab:green", "--"), ("black", ":"), ("tab:gray", "-."))):
        ax.axvline(value, color=style[0], linestyle=style[1], label=name)
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    ax.legend()
    return fig


def roc_pr_curves(labels: np.ndarray, scores: np.ndarray, title: str = "image") -> Figure:
    """ROC (with AUROC) and precision-recall (with AP) side by side.

    A validation split can hold a single class (e.g. a category with no held-out anomalies); the curves are then
    undefined, so the axes carry a note instead of the trial failing on a diagnostic plot.
    """
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise DataError(f"roc_pr_curves({title!r}): labels {labels.shape} and scores {scores.shape} differ")
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    fig.suptitle(f"{title} ({labels.size} samples, {int(np.sum(labels == 1))} anomalous)")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    if np.unique(labels).size < 2:
        for ax in (roc_ax, pr_ax):
            ax.text(0.5, 0.5, "undefined: labels hold a single class", ha="center", va="center", transform=ax.transAxes)
        return fig
    fpr, tpr, _ = roc_curve(labels, scores)
    roc_ax.plot(fpr, tpr, label=f"AUROC = {roc_auc_score(labels, scores):.4f}")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    precision, recall, _ = precision_recall_curve(labels, scores)
    pr_ax.step(recall, precision, where="post", label=f"AP = {average_precision_score(labels, scores):.4f}")
    pr_ax.axhline(np.mean(labels == 1), color="grey", linestyle="--", linewidth=0.8)
    roc_ax.legend(loc="lower right")
    pr_ax.legend(loc="lower left")
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at 100 dpi and free it, so that a long sweep does not accumulate figures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    fig.clear()
    return path
