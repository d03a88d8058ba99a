"""Sweep configs are validated on load: every mistake names its key and file before any Ray work."""

from pathlib import Path

import pytest
import yaml

from bgad_core.errors import ConfigError
from bgad_core.engine.stopping import PlateauConfig
from sweeper.job.config import load_config
from sweeper.tuning.sweep import fixed_params, grid_space, optuna_distribution, paper_default_params

SEARCH_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("name", sorted(p.name for p in SEARCH_SPACES.glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    config = load_config(SEARCH_SPACES / name)
    assert config.search.num_samples >= 1


def write(tmp_path, raw):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def base():
    """The quickstart as a single-family (BGAD) search: its ``search.families.bgad`` as ``search.space``."""
    raw = yaml.safe_load((SEARCH_SPACES / "quickstart.yaml").read_text())
    raw["search"]["space"] = raw["search"].pop("families")["bgad"]
    return raw


def cross_family():
    return yaml.safe_load((SEARCH_SPACES / "quickstart.yaml").read_text())


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda r: r["search"]["families"].update(efficientad={}), "search.families"),
        (lambda r: r["search"]["families"]["patchcore"].update(beta={"uniform": [0.1, 0.2]}), "search.families.patchcore"),
        (lambda r: r["search"]["families"]["bgad"].update(beta={"uniform": [0.5, 1.5]}), "search.families.bgad.beta"),
        (lambda r: r["search"]["families"]["patchcore"].update(coreset_ratio={"choice": [0.0, 0.1]}),
         "search.families.patchcore.coreset_ratio"),
        (lambda r: r["search"].update(space={"beta": {"uniform": [0.1, 0.2]}}), "search.space and search.families"),
        (lambda r: r["train"].update(betta=1.0), "train"),
        (lambda r: r["train"].update(family="efficientad"), "family"),
        (lambda r: r.update(baseline={"family": "nope"}), "baseline.family"),
    ],
)
def test_bad_family_values_name_their_key(tmp_path, edit, key):
    assert_refused_naming(tmp_path, cross_family(), edit, key)


def assert_refused_naming(tmp_path, raw, edit, key):
    """``edit`` makes ``raw`` invalid: loading it fails naming the file and ``key``."""
    edit(raw)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        load_config(write(tmp_path, raw))
    assert "sweep.yaml" in str(error.value)


def test_a_cross_family_search_trains_each_family_with_its_own_fields(tmp_path):
    """``train`` holds fields of either family; each trial keeps its own (a BGAD field never reaches PatchCore)."""
    from sweeper.tuning.sweep import fixed_params, schedule_length
    from sweeper.tuning.trainable import split_params

    config = load_config(write(tmp_path, cross_family()))
    assert config.families() == ["bgad", "patchcore"]
    fixed = fixed_params(config)
    assert schedule_length(config, fixed) == 4  # BGAD's schedule; PatchCore's single pass sets no rung
    chosen, patchcore, data = split_params({**fixed, "family": "patchcore", "patchcore": {"coreset_ratio": 0.1}})
    assert chosen.name == "patchcore" and patchcore.coreset_ratio == 0.1 and data["num_anomalies"] == 0
    chosen, bgad, data = split_params({**fixed, "family": "bgad", "bgad": {"beta": 0.02, "num_anomalies": 2}})
    assert chosen.name == "bgad" and bgad.beta == 0.02 and bgad.lr == 0.001 and data["num_anomalies"] == 2


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda r: r["search"]["space"].update(betta={"uniform": [0.1, 0.2]}), "betta"),
        (lambda r: r["search"]["space"].update(beta={"uniform": [0.5, 1.5]}), "search.space.beta"),
        (lambda r: r["search"].update(space={}), "search.space"),
        (lambda r: r["train"].update(beta=0.0), "train"),
        (lambda r: r["tune"].update(metric="test_aupro"), "tune.metric"),
        (lambda r: r["tune"].update(metric="val_image_auprc"), "tune.metric"),
        (lambda r: r["tune"].update(schedulr={}), "tune.schedulr"),
        (lambda r: r["search"]["space"].update(racp_depth={"choice": [3, 12]}), "search.space.racp_depth"),
        (lambda r: r["search"]["space"].update(tau={"uniform": [0.3, 0.1]}), "search.space.tau"),
        (lambda r: r.update(baseline={"feature_strides": [4, 8]}), "baseline.feature_strides"),
        (lambda r: r.update(baseline={"coreset_ratio": 0.0}), "baseline.coreset_ratio"),
        (lambda r: r["train"].update(local_aggregation=2), "train"),
        (lambda r: r["search"]["space"].update(push_fraction={"uniform": [0.0, 0.5]}), "search.space.push_fraction"),
        (lambda r: r["tune"].update(plateau={"patience": -1}), "tune.plateau.patience"),
        (lambda r: r["tune"].update(plateau={"patience": 2.5}), "tune.plateau.patience"),
        (lambda r: r["tune"].update(plateau={"min_delta": -0.01}), "tune.plateau.min_delta"),
        (lambda r: r["tune"].update(plateau={"min_delta": float("inf")}), "tune.plateau.min_delta"),
        (lambda r: r["tune"].update(plateau={"patiense": 3}), "tune.plateau.patiense"),
    ],
)
def test_bad_values_name_their_key(tmp_path, edit, key):
    assert_refused_naming(tmp_path, base(), edit, key)


def test_cache_follows_the_search_space(tmp_path):
    raw = base()
    raw["search"]["space"]["num_anomalies"] = {"randint": [1, 7]}
    raw["search"]["space"]["racp_depth"] = {"choice": [0, 2, 5]}
    config = load_config(write(tmp_path, raw))
    assert config.cache.max_anomalies == 7 and config.cache.racp_depths == [0, 2, 5]
    raw["cache"]["max_anomalies"] = 5
    with pytest.raises(ConfigError, match="max_anomalies"):
        load_config(write(tmp_path, raw))


def test_search_translations():
    config = load_config(SEARCH_SPACES / "paper_grid.yaml")
    grid = grid_space(config)
    assert grid["beta"] == {"grid_search": [0.01, 0.05, 0.1]} and grid["tau"] == {"grid_search": [0.1, 0.2, 0.3]}
    optuna_config = load_config(SEARCH_SPACES / "default_optuna.yaml")
    beta = optuna_distribution(optuna_config.search.space["beta"])
    assert beta.log and beta.low == 0.005
    fixed = fixed_params(optuna_config)
    assert fixed["meta_epochs"] == 25 and fixed["num_anomalies"] == 10
    paper = paper_default_params(load_config(SEARCH_SPACES / "quickstart.yaml"))
    assert paper["beta"] == 0.01 and paper["num_anomalies"] == 3 and paper["racp_depth"] == 3


@pytest.mark.parametrize("metric, stored", [("image_aupr", "val_image_aupr"), ("val_image_aupr", "val_image_aupr"),
                                            ("aupro_image_auroc_mean", "val_aupro_image_auroc_mean")])
def test_a_named_metric_is_the_objective(tmp_path, metric, stored):
    from sweeper.tuning.sweep import objective_metric

    raw = base()
    raw["tune"]["metric"] = metric
    config = load_config(write(tmp_path, raw))
    assert config.tune.metric == stored
    assert objective_metric(config, {"categories": {"tiles": {"has_masks": True}}}) == stored


@pytest.mark.parametrize("masks, stored", [((True, True), "val_aupro_image_auroc_mean"),
                                           ((True, False), "val_image_auroc")])
def test_auto_is_the_mean_of_pro_and_image_auroc_where_every_category_has_masks(tmp_path, masks, stored):
    from sweeper.tuning.sweep import objective_metric

    config = load_config(write(tmp_path, base()))
    assert config.tune.metric == "auto"
    categories = {f"c{i}": {"has_masks": m} for i, m in enumerate(masks)}
    assert objective_metric(config, {"categories": categories}) == stored


def test_summary_table_shows_every_arm_beside_the_trial_counts():
    from sweeper.tuning.sweep import summary_table

    arm = {"val": {"aupro": 0.5}, "test": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7}}
    entry = {"trials": {"finished": 2, "pruned": 1, "failed": 0}, "best": arm, "paper_default": arm, "baseline": arm}
    table = summary_table({"objective": "val_aupro", "categories": {"tiles": entry}}).splitlines()
    assert table[2].startswith("| tiles | 2/1/0 | best trial | 0.500 | 0.900 |")
    assert [row.split(" | ")[2] for row in table[2:]] == ["best trial", "paper default", "one-class baseline"]


def test_summary_table_shows_intervals_and_a_test_column_for_the_objective():
    from sweeper.tuning.sweep import summary_table

    arm = {"val": {"image_aupr": 0.874, "image_aupr_lo": 0.8123, "image_aupr_hi": 0.9311},
           "test": {"image_auroc": 0.9, "image_auroc_lo": 0.85, "image_auroc_hi": 0.95, "image_aupr": 0.7}}
    entry = {"trials": {"finished": 1, "pruned": 0, "failed": 0}, "best": arm}
    header, rule, row = summary_table({"objective": "val_image_aupr", "categories": {"tiles": entry}}).splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 9
    assert header.endswith("| val image_aupr | test image AUROC | test pixel AUROC | test PRO | test image_aupr |")
    assert row == "| tiles | 1/0/0 | best trial | 0.874 [0.81, 0.93] | 0.900 [0.85, 0.95] | - | - | 0.700 |"


def test_unseen_defect_protocol_reads_test_per_group_of_types():
    """Under ``train_defect_types`` the test figures come per group as well: normals against the seen types'
    anomalies, and against the unseen ones; the table shows a row for each."""
    import torch

    from bgad_core.data.features import FeatureSet
    from sweeper.tuning.sweep import split_figures, summary_table

    types = ["good"] * 6 + ["crack"] * 3 + ["fray"] * 3
    labels = torch.tensor([0] * 6 + [1] * 6)
    split = FeatureSet([torch.zeros(12, 1, 2, 2)], [torch.zeros(12, 2, 2)], labels,
                       [f"test/{kind}/{i}.png" for i, kind in enumerate(types)])
    # seen cracks score above every normal; unseen frays sit in the middle of them
    scores = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9, 0.95, 0.99, 0.25, 0.4, 0.65])
    figures, _ = split_figures(split, scores, None, seen_types=["crack"])
    assert figures["seen_image_auroc"] == 1.0
    assert abs(figures["unseen_image_auroc"] - 10 / 18) < 1e-9  # frays beat 2, 3 and 5 of the 6 normals
    assert figures["seen_image_auroc_lo"] <= 1.0 and "unseen_image_auroc_hi" in figures
    assert "seen_image_auroc" not in split_figures(split, scores, None)[0]  # no protocol, no groups
    arm = {"val": {"image_auroc": 0.9}, "test": figures}
    entry = {"trials": {"finished": 1, "pruned": 0, "failed": 0}, "best": arm}
    rows = summary_table({"objective": "val_image_auroc", "categories": {"tiles": entry}}).splitlines()[2:]
    assert [row.split(" | ")[2] for row in rows] == ["best trial", "best trial, seen defect types",
                                                     "best trial, unseen defect types"]
    assert rows[1].split(" | ")[4].startswith("1.000") and rows[2].split(" | ")[4].startswith("0.556")


def test_the_summary_ends_with_a_verdict_per_category():
    """Below the table, each category's verdict: told apart from an arm beyond the paired interval, or not, with
    roughly how many images would separate them at the observed gap."""
    from sweeper.tuning.sweep import summary_table

    arm = {"val": {"aupro": 0.5}, "test": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7}}
    verdicts = {
        "paper_default": {"metric": "aupro", "gap": 0.012, "lo": -0.01, "hi": 0.034, "images": 110,
                          "images_to_separate": 924, "verdict": "undecided"},
        "baseline": {"metric": "aupro", "gap": 0.051, "lo": 0.02, "hi": 0.083, "images": 110,
                     "images_to_separate": None, "verdict": "better"},
    }
    entry = {"trials": {"finished": 2, "pruned": 1, "failed": 0}, "best": arm, "paper_default": arm, "baseline": arm,
             "verdicts": verdicts}
    lines = summary_table({"objective": "val_aupro", "categories": {"tiles": entry}}).splitlines()
    assert lines[-2] == ""
    assert lines[-1] == ("verdict tiles: on 110 test images (test PRO, paired 95 % interval of the difference), the "
                         "best trial is not told apart from the paper default (+0.012 [-0.010, +0.034]; about 924 "
                         "images would separate them at this gap); better than the one-class baseline "
                         "(+0.051 [+0.020, +0.083])")


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda r: r.update(name="bob's-sweep"), "name"),
        (lambda r: r["datasets"][0]["synthetic"].update(name="x' OR '1'='1"), "datasets[0].synthetic.name"),
        (lambda r: r.update(mlflow={"experiment": "team a"}), "mlflow.experiment"),
        (lambda r: r.update(datasets=[{"path": "data/my tiles"}]), "datasets[0]"),
    ],
)
def test_names_that_reach_mlflow_must_be_safe(tmp_path, edit, key):
    """Quotes or spaces in a name would break MLflow tags and filters deep in a sweep: refused on load instead."""
    raw = base()
    edit(raw)
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, raw))
    line = next(line for line in str(error.value).splitlines() if line.strip().startswith(f"{key}:"))
    assert "1 to 64 letters, digits, '_', '.' or '-'" in line and "sweep.yaml" in str(error.value)



def test_a_trial_over_several_categories_reports_intervals_of_its_mean_and_of_each():
    from types import SimpleNamespace

    import torch

    from benchmarks.bench_aupro import make_split
    from sweeper.tuning.trainable import _validation_intervals

    runs = []
    for seed, name in enumerate(("tiles", "rails")):
        labels, scores, masks, maps = make_split(16, 32, seed)
        val = SimpleNamespace(labels=torch.tensor(labels), pixel_masks=torch.tensor(masks) if seed == 0 else None)
        last = SimpleNamespace(scores=torch.tensor(scores), maps=torch.tensor(maps))
        runs.append(SimpleNamespace(name=name, val=val, last=last, intervals={}))
    intervals = _validation_intervals(runs, pixels=True)
    assert intervals["val_image_auroc_lo"] < intervals["val_image_auroc_hi"]
    assert "tiles/val_aupro_lo" in intervals and "rails/val_aupro_lo" not in intervals  # rails has no masks
    assert "val_aupro_lo" not in intervals  # the mean covers the metrics every category has
    assert runs[0].intervals["aupro_lo"] == intervals["tiles/val_aupro_lo"]  # what the checkpoint records


def test_plateau_stopping_is_on_by_default_and_can_be_turned_off(tmp_path):
    raw = base()
    assert load_config(write(tmp_path, raw)).tune.plateau.rule() == PlateauConfig()
    raw["tune"]["plateau"] = {"enabled": False, "patience": 5}
    assert not load_config(write(tmp_path, raw)).tune.plateau.rule().enabled
    raw["tune"]["plateau"] = {"patience": 0}
    assert not load_config(write(tmp_path, raw)).tune.plateau.rule().enabled
    raw["tune"]["plateau"] = {"patience": 4, "min_delta": 0}
    assert load_config(write(tmp_path, raw)).tune.plateau.rule() == PlateauConfig(4, 0.0)


def test_a_family_whose_trials_never_reached_a_selectable_epoch_has_no_best_value():
    """A BGAD trial pruned in its normal-only phase reports only the "not selectable" mark: the summary's per-family
    line shows no figure for it ("-"), never the mark (-1) as if it were a validation score."""
    import pandas as pd
    from types import SimpleNamespace

    from sweeper.tuning.sweep import family_bests
    from sweeper.tuning.trainable import SELECTION_KEY, UNSELECTABLE

    def result(family, scores, trial_id):
        return SimpleNamespace(config={"family": family}, metrics={"trial_id": trial_id},
                               metrics_dataframe=pd.DataFrame({SELECTION_KEY: scores}))

    bests = family_bests([result("bgad", [UNSELECTABLE], "a"), result("patchcore", [0.9], "b"),
                          result("bgad", [UNSELECTABLE, 0.7, float("nan")], "c")], {})
    assert bests["patchcore"] == {"trials": 1, "val": 0.9, "trial_id": "b"}
    assert bests["bgad"] == {"trials": 2, "val": 0.7, "trial_id": "c"}
    assert family_bests([result("bgad", [UNSELECTABLE], "a")], {})["bgad"]["val"] is None


def test_closing_lines_name_the_winners_family_and_its_searched_parameters(tmp_path):
    """A cross-family sweep searches no top-level parameter: the winner's line shows its family's sub-space."""
    from sweeper.run import closing_lines

    raw = base()
    raw["search"] = {"families": {"bgad": {"beta": {"loguniform": [0.005, 0.1]}},
                                  "patchcore": {"num_neighbors": {"choice": [1, 9]}}}}
    config = load_config(write(tmp_path, raw))
    entry = {"best": {"trial_id": "abc", "family": "bgad", "epoch": 3, "config": {"beta": 0.0123, "tau": 0.1}}}
    lines = closing_lines({"sweep_id": "s", "mlflow_view": "v", "categories": {"tiles": entry}}, config,
                          "sqlite:///x.db", tmp_path / "log").splitlines()
    assert lines[1] == "best trial for tiles: abc (bgad, meta-epoch 3): beta=0.0123"
