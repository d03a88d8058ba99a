"""Plateau stopping replayed on the recorded 25 x 8 learning curves: where it stops, what it selects, what it saves.

    .venv/bin/python -m benchmarks.bench_plateau [--patience 3] [--min-delta 0.005] [--grid]

No training: the validation objective and test figures of every meta-epoch are the ones BENCHMARKS.md records in
"Learning curves at the paper's schedule, 25 x 8 (fourth session)" (one default trial per dataset, 25 x 8 epochs,
warm-up 2, phase 1 = meta-epoch 1). Each curve is fed through ``bgad_core.engine.stopping.PlateauRule``, the rule
``train_and_select`` and the sweep's trials use, until it says stop; the epoch is then selected as
``train_and_select`` selects it (the first strict maximum of validation after phase 1, among the meta-epochs run)
and its test figures are compared with those of the full run's selected epoch. Meta-epochs trained stand in for
trial time: a phase-2 meta-epoch costs about the same at every epoch, and the phase-1 one (normals only) less, so
the time fraction is a little below the meta-epoch fraction.

``--grid`` prints, per (patience, min_delta), the largest test difference to the full run over the three BGAD-FAS
runs and plain BGAD on BrainMRI, and the meta-epochs they train: the evidence for the defaults.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from bgad_core.engine.stopping import PlateauConfig, PlateauRule, first_watched_epoch

META_EPOCHS = 25
NORMAL_EPOCHS = 1  # BGADConfig().normal_epochs of the recorded runs


@dataclass(frozen=True)
class Curve:
    """One recorded run: validation objective and test figures after each meta-epoch 1..25."""

    name: str
    objective: str
    val: tuple[float, ...]
    test_image_auroc: tuple[float, ...]
    test_pro: tuple[float, ...] | None = None


def series(text: str) -> tuple[float, ...]:
    """A column of the recorded table, meta-epochs 1..25 in order."""
    values = tuple(float(v) for v in text.split())
    if len(values) != META_EPOCHS:
        raise ValueError(f"{len(values)} values, expected one per meta-epoch ({META_EPOCHS}): {text}")
    return values


# BENCHMARKS.md, "Learning curves at the paper's schedule, 25 x 8 (fourth session)", the per-meta-epoch table's
# columns: validation objective, test image AUROC, test PRO.
CURVES = (
    Curve(
        "MTD-200 BGAD-FAS", "val PRO",
        series("0.591 0.770 0.788 0.801 0.789 0.814 0.815 0.825 0.838 0.834 0.829 0.826 0.844 "
               "0.817 0.824 0.832 0.837 0.834 0.830 0.837 0.836 0.838 0.836 0.838 0.838"),
        series("0.792 0.916 0.908 0.896 0.896 0.914 0.891 0.906 0.908 0.900 0.878 0.857 0.910 "
               "0.872 0.867 0.886 0.888 0.889 0.867 0.877 0.882 0.880 0.884 0.879 0.880"),
        series("0.628 0.766 0.781 0.786 0.778 0.793 0.807 0.808 0.819 0.815 0.811 0.808 0.822 "
               "0.805 0.814 0.816 0.818 0.813 0.814 0.820 0.817 0.819 0.817 0.819 0.818"),
    ),
    Curve(
        "KolektorSDD BGAD-FAS", "val PRO",
        series("0.419 0.560 0.563 0.530 0.505 0.500 0.512 0.510 0.498 0.498 0.471 0.470 0.471 "
               "0.467 0.474 0.486 0.457 0.448 0.458 0.448 0.448 0.450 0.447 0.448 0.445"),
        series("0.817 0.927 0.949 0.906 0.901 0.895 0.906 0.904 0.882 0.894 0.902 0.891 0.905 "
               "0.885 0.910 0.895 0.890 0.882 0.880 0.885 0.884 0.880 0.875 0.876 0.869"),
        series("0.479 0.620 0.611 0.563 0.567 0.554 0.552 0.552 0.545 0.539 0.530 0.524 0.517 "
               "0.505 0.522 0.538 0.515 0.500 0.498 0.500 0.497 0.499 0.498 0.497 0.496"),
    ),
    Curve(
        "BrainMRI BGAD-FAS", "val image AUROC",
        series("0.589 0.843 0.917 0.939 0.952 0.920 0.902 0.907 0.911 0.887 0.878 0.861 0.863 "
               "0.865 0.859 0.857 0.859 0.863 0.863 0.865 0.859 0.865 0.865 0.865 0.865"),
        series("0.734 0.793 0.837 0.901 0.926 0.912 0.860 0.858 0.873 0.860 0.843 0.849 0.850 "
               "0.859 0.853 0.855 0.854 0.856 0.860 0.859 0.856 0.853 0.857 0.857 0.857"),
    ),
    Curve(
        "BrainMRI BGAD (no labels)", "val image AUROC",
        series("0.589 0.748 0.841 0.857 0.861 0.852 0.872 0.896 0.909 0.909 0.909 0.922 0.924 "
               "0.928 0.933 0.943 0.946 0.948 0.957 0.957 0.957 0.957 0.957 0.959 0.959"),
        series("0.734 0.776 0.783 0.800 0.819 0.828 0.832 0.839 0.845 0.855 0.864 0.868 0.873 "
               "0.873 0.876 0.876 0.876 0.878 0.879 0.879 0.880 0.881 0.882 0.882 0.882"),
    ),
)


@dataclass(frozen=True)
class Replay:
    """One curve under one rule: the meta-epoch it stopped after, the epoch it selected and the full run's."""

    curve: Curve
    stopped: int
    selected: int
    full_selected: int

    def test_gap(self) -> float:
        """The largest |test difference| between the selected epoch and the full run's (image AUROC and PRO)."""
        series = [self.curve.test_image_auroc] + ([self.curve.test_pro] if self.curve.test_pro else [])
        return max(abs(s[self.selected - 1] - s[self.full_selected - 1]) for s in series)


def select(val: Sequence[float], ran: int) -> int:
    """The epoch ``train_and_select`` keeps among the first ``ran``: the first strict maximum after phase 1."""
    first = first_watched_epoch(NORMAL_EPOCHS, META_EPOCHS)
    best = first
    for epoch in range(first, ran + 1):
        if val[epoch - 1] > val[best - 1]:
            best = epoch
    return best


def replay(curve: Curve, config: PlateauConfig) -> Replay:
    """Feed ``curve``'s validation through the plateau rule until it stops (or the schedule ends)."""
    rule = PlateauRule(config, first_watched_epoch(NORMAL_EPOCHS, META_EPOCHS))
    stopped = next((epoch for epoch, value in enumerate(curve.val, 1) if rule.update(epoch, value)), META_EPOCHS)
    return Replay(curve, stopped, select(curve.val, stopped), select(curve.val, META_EPOCHS))


def report(config: PlateauConfig) -> None:
    """Per curve: stop, selection and test figures against the full run; then the saving over the BGAD-FAS runs."""
    print(f"patience {config.patience}, min_delta {config.min_delta}; test at the selected epoch vs the full run's")
    print("| run | stops after | selects (val) | full run selects (val) | test image AUROC | test PRO | "
          "meta-epochs trained |")
    print("|---|---|---|---|---|---|---|")
    replays = [replay(curve, config) for curve in CURVES]
    for r in replays:
        c, s, f = r.curve, r.selected, r.full_selected
        pro = f"{c.test_pro[s - 1]:.3f} vs {c.test_pro[f - 1]:.3f}" if c.test_pro else "-"
        print(f"| {c.name} | {r.stopped} | {s} ({c.objective} {c.val[s - 1]:.3f}) | {f} ({c.val[f - 1]:.3f}) | "
              f"{c.test_image_auroc[s - 1]:.3f} vs {c.test_image_auroc[f - 1]:.3f} | {pro} | "
              f"{r.stopped}/{META_EPOCHS} ({r.stopped / META_EPOCHS:.0%}) |")
    fas = [r for r in replays if "BGAD-FAS" in r.curve.name]
    trained = sum(r.stopped for r in fas)
    print(f"\nBGAD-FAS on the three shared datasets: {trained} of {len(fas) * META_EPOCHS} meta-epochs trained "
          f"({trained / (len(fas) * META_EPOCHS):.0%}, {1 - trained / (len(fas) * META_EPOCHS):.0%} saved); "
          f"largest test difference to the full run {max(r.test_gap() for r in fas):.3f} (target <= 0.005)")


def grid() -> None:
    """Largest test gap and meta-epochs trained over all four curves, per (patience, min_delta)."""
    deltas = (0.0, 0.002, 0.005, 0.01, 0.02)
    print("\nlargest test difference to the full run (all four curves) / meta-epochs trained (of 100)")
    print("| patience | " + " | ".join(f"min_delta {d}" for d in deltas) + " |")
    print("|---" * (len(deltas) + 1) + "|")
    for patience in range(1, 7):
        cells = []
        for delta in deltas:
            replays = [replay(curve, PlateauConfig(patience, delta)) for curve in CURVES]
            cells.append(f"{max(r.test_gap() for r in replays):.3f} / {sum(r.stopped for r in replays)}")
        print(f"| {patience} | " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    defaults = PlateauConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="meta-epochs without a gain before stopping (default: %(default)s, the code's default)")
    parser.add_argument("--min-delta", type=float, default=defaults.min_delta,
                        help="smallest validation rise that counts as a gain (default: %(default)s)")
    parser.add_argument("--grid", action="store_true", help="also print the sensitivity over patience x min_delta")
    args = parser.parse_args(argv)
    report(PlateauConfig(args.patience, args.min_delta))
    if args.grid:
        grid()


if __name__ == "__main__":
    main()
