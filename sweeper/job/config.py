"""Sweep configuration: one YAML file, validated by pydantic models before any work starts.

Every section forbids unknown keys (a typo such as ``imgae_size`` must fail rather than silently fall back to the
default) and is strict about types (``per_defect_type: 1`` is not a bool). ``load_config`` turns YAML and validation
errors into a ``bgad_core.errors.ConfigError`` naming the file and the dotted key, e.g.
``sweep.yaml: cache.racp_depths[1]: ...``. Names that reach MLflow tags and search filters (the sweep's ``name``,
category names, ``mlflow.experiment``) must be safe names (``sweeper.job.names.SAFE_NAME_RULE``).

Relative local paths (``datasets[].path``, ``cache.root``) are resolved against the current working directory when
they are used, not against the YAML file, so ``python -m sweeper.cache --config configs/x.yaml`` run from the repo
root reads ``../shared/data/...`` as written. ``datasets[].path``, ``cache.root`` and ``tune.storage_path`` also take
storage URIs (``s3://bucket/prefix``, ``gs://...``): what a multi-node cluster needs (cluster/README.md).
None of them, nor ``tune.optuna_storage`` or ``mlflow.tracking_uri``, may carry a credential (``user:password@``,
``?secret_key=``): the config is refused with where the secret goes instead (``sweeper.job.credentials``).

Sections, in file order: ``datasets`` (what to read), ``data`` (how to split it), ``backbone`` (how to turn images
into features), ``cache`` (where features are stored and how the synthetic anomalies are pre-generated). New sections
subclass ``Section`` and are added as fields of ``SweepConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from bgad_core.data.racp import TRANSFORMS
from bgad_core.backbone import DEFAULT_BACKBONE, DEFAULT_STRIDES, WEIGHT_MODES
from bgad_core.errors import ConfigError
from bgad_core.engine.stopping import PlateauConfig
from bgad_core.evaluation.metrics import PRO_AND_IMAGE_AUROC
from bgad_core.data.synthetic import DEFECT_TYPES
from bgad_core.models.base import ONE_CLASS
from bgad_core.models.registry import DEFAULT_FAMILY, config_for, family, family_names
from sweeper.job import credentials
from sweeper.job.names import SAFE_NAME_RULE, check_name, is_safe_name

SafeName = Annotated[str, AfterValidator(check_name)]


class Section(BaseModel):
    """Base of every config section: unknown keys and loosely typed values are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


SECRET_IN_URI = "secret_in_uri"  # its errors never echo the value: it holds the secret


def _no_secret(uri: str) -> str:
    problem = credentials.uri_problem(uri)
    if problem is not None:
        raise PydanticCustomError(SECRET_IN_URI, "{problem}", {"problem": problem})
    return uri


# A path or storage URL of the config, which is logged, hashed and pickled: never one with a credential inside.
Location = Annotated[str, AfterValidator(_no_secret)]


class SyntheticSpec(Section):
    """Arguments of ``bgad_core.data.synthetic.make_synthetic_category`` (a generated MVTec-layout category).

    The category is generated deterministically before use into ``<cache.root>/../data/<name>`` when the cache root
    is a local path; when it is a storage URI, into ``runs/data/generated/<digest>/<name>`` (working directory) and
    uploaded to ``<cache.root>/datasets/<digest>/<name>``, so every node of a cluster reads the same files.
    """

    name: SafeName = "synthetic"
    size: int = Field(128, ge=32)
    n_train: int = Field(40, ge=1)
    n_test_good: int = Field(20, ge=1)
    n_test_per_defect: int = Field(10, ge=1)
    defect_types: list[str] = Field(default_factory=lambda: ["scratch", "spot"], min_length=1)
    seed: int = Field(0, ge=0)

    @field_validator("defect_types")
    @classmethod
    def _known_defects(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in DEFECT_TYPES]
        if unknown or len(set(value)) != len(value):
            raise ValueError(f"must be distinct names from {list(DEFECT_TYPES)}")
        return value


class DatasetSpec(Section):
    """One category: an existing directory (``path`` + ``layout``) or a generated one (``synthetic``).

    ``path`` is a directory (on a multi-node cluster: on shared storage or baked into the image at the same path on
    every node) or a storage URI such as ``s3://bucket/mvtec/bottle``. ``name`` is the category name used in the
    cache and in results; it defaults to the directory's name (or the synthetic category's name) and must be unique
    within a sweep.
    """

    path: Location | None = None
    layout: Literal["auto", "mvtec", "btad", "folder"] = "auto"
    name: SafeName | None = None
    synthetic: SyntheticSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of 'path' (an existing category) or 'synthetic' (a generated one)")
        if self.synthetic is not None and (self.name is not None or self.layout != "auto"):
            raise ValueError("'name' and 'layout' belong to 'path' datasets; synthetic.name names a synthetic one")
        if not is_safe_name(self.category):
            raise ValueError(f"category name {self.category!r} (the directory's name) must be {SAFE_NAME_RULE}; "
                             "set 'name'")
        return self

    @property
    def category(self) -> str:
        """The category name (see the class docstring)."""
        if self.synthetic is not None:
            return self.synthetic.name
        if self.name:
            return self.name
        path = str(self.path)
        return PurePosixPath(urlparse(path).path).name if "://" in path else Path(path).resolve().name


class DataSpec(Section):
    """How every category is split (``bgad_core.data.splits.make_splits``) and loaded.

    ``on_bad_image``: ``error`` stops the cache build at the first unreadable image (naming it); ``skip`` leaves it
    out with a warning and records it in the cache manifest. Entries named like images that are no readable file
    (dangling symlink, symlink loop, directory, no read permission) stop the build too, or with ``skip`` are left
    out of the dataset with a warning naming each (``bgad_core.data.datasets.read_category``).
    """

    image_size: int = Field(256, ge=32)
    per_defect_type: bool = True
    val_fraction: float = Field(0.3, gt=0, lt=1)
    split_seed: int = Field(0, ge=0)
    max_train_normals: int | None = Field(None, ge=1)
    train_defect_types: list[str] | None = Field(None, min_length=1)
    on_bad_image: Literal["error", "skip"] = "error"


class BackboneSpec(Section):
    """The frozen feature extractor (``bgad_core.backbone.FeatureExtractor``)."""

    name: str = Field(DEFAULT_BACKBONE, min_length=1)
    weights: str = Field("auto", min_length=1)
    strides: list[int] = Field(default_factory=lambda: list(DEFAULT_STRIDES), min_length=1)

    @field_validator("strides")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if value[0] < 1 or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError("must be positive and strictly increasing")
        return value


class BaselineSpec(Section):
    """The one-class baseline every sweep reports beside its best trial (a family of ``bgad_core.models``, fitted once
    with these values; fields its config lacks are ignored).

    It sees no defect, so the gap between it and the best trial is what the labelled anomalies bought.

    Attributes:
        enabled: fit and evaluate it for each category after the search.
        family: the one-class family to fit.
        feature_strides: cached levels it reads (each must be one of ``backbone.strides``; PatchCore: 8 and 16).
        coreset_ratio: share of the training patches kept in its memory bank.
        num_neighbors: bank neighbours that re-weight its image score.
    """

    enabled: bool = True
    family: str = "patchcore"
    feature_strides: list[int] = Field(default_factory=lambda: [8, 16], min_length=1)
    coreset_ratio: float = Field(0.01, gt=0, le=1)
    num_neighbors: int = Field(9, ge=1)


class CacheSpec(Section):
    """Where and how features are cached (see ``sweeper.cache.build`` for the layout and the cost of the choices).

    Attributes:
        root: local path or pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://...``) holding the caches.
        dtype: storage type of the features (float16 halves size and read time; fp16 error ~1e-3 relative).
        max_anomalies: K_max, real anomalies drawn per defect type once per sweep; trials use the first n <= K_max.
        racp_depths: every RandAugment depth S a sweep may ask for; each costs a full set of synthetic rows.
        racp_per_anomaly: M, synthetic RACP samples cached per drawn anomaly and depth (0: none).
        racp_seed: seeds the synthetic samples.
        batch_size: images per backbone call.
        actors: extraction actors (one model replica each).
        gpus_per_actor: GPUs per actor; None = 1 when the cluster has GPUs, else 0.
        cpus_per_actor: CPUs per actor (also torch's thread count when it runs on CPU).
        max_cpus: cap on the CPUs the build's Ray Data pipeline may use (None: all); set it when other Ray work
            shares the cluster during the build.
        hash_images: ``content`` (sha256 of every image and mask) or ``stat`` (size + mtime: fast, but blind to
            edits that keep both).
    """

    root: Location = Field("runs/cache", min_length=1)
    dtype: Literal["float16", "float32"] = "float16"
    max_anomalies: int = Field(10, ge=0)
    racp_depths: list[int] = Field(default_factory=lambda: [3])
    racp_per_anomaly: int = Field(8, ge=0)
    racp_seed: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    actors: int = Field(1, ge=1)
    gpus_per_actor: float | None = Field(None, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    max_cpus: float | None = Field(None, gt=0)
    hash_images: Literal["content", "stat"] = "content"

    @field_validator("racp_depths")
    @classmethod
    def _valid_depths(cls, value: list[int]) -> list[int]:
        bad = [d for d in value if not 0 <= d <= len(TRANSFORMS)]
        if bad or len(set(value)) != len(value):
            raise ValueError(f"must be distinct ints in [0, {len(TRANSFORMS)}]")
        return sorted(value)


TUNABLE_DATA_KEYS = ("num_anomalies", "racp_depth")
FAMILY_KEY = "family"


def tunable_keys(families: Sequence[str]) -> frozenset[str]:
    """What ``train`` may fix and a search may vary for these families: their config fields, the data selection
    and ``family`` itself."""
    fields_of = set().union(*(family(name).parameters() for name in families))
    return frozenset(fields_of | set(TUNABLE_DATA_KEYS) | {FAMILY_KEY})


class ParamSpec(Section):
    """One searched parameter: exactly one distribution (``randint`` bounds are inclusive)."""

    uniform: list[float] | None = Field(None, min_length=2, max_length=2)
    loguniform: list[float] | None = Field(None, min_length=2, max_length=2)
    randint: list[int] | None = Field(None, min_length=2, max_length=2)
    choice: list[bool | int | float | str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_distribution(self) -> ParamSpec:
        given = [k for k in ("uniform", "loguniform", "randint", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, loguniform, randint, choice")
        bounds = getattr(self, given[0])
        if given[0] != "choice" and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: lower bound must be below the upper bound")
        if given[0] == "loguniform" and bounds[0] <= 0:
            raise ValueError("loguniform: bounds must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("uniform", "loguniform", "randint", "choice") if getattr(self, k) is not None)

    def values(self) -> list[Any]:
        """Every value an integer or categorical parameter can take (bounds for continuous ones)."""
        if self.randint is not None:
            return list(range(self.randint[0], self.randint[1] + 1))
        return list(getattr(self, self.kind))


class SearchSpec(Section):
    """What to try.

    Attributes:
        algorithm: ``optuna`` (TPE over ``space`` or ``families``, seeded, study in ``tune.optuna_storage``) or
            ``grid`` (every combination of ``grid``, each ``num_samples`` times).
        num_samples: Optuna trials per category (grid: repeats of the whole grid).
        seed: TPE sampler seed.
        space: parameter -> distribution, for ``optuna``, searching one family (``train.family``, default bgad).
        families: family -> its parameters' distributions (``{}``: none searched), for ``optuna`` across families:
            the family is a searched categorical and each trial samples only its family's sub-space (Optuna
            define-by-run; TPE models each family's parameters apart: multivariate, grouped). Replaces ``space``.
        grid: parameter -> list of values, for ``grid``.
        compare_paper_default: also train the paper's default configuration with the same schedule (no ASHA; it
            stops at its plateau as the trials do, ``tune.plateau``) and report its test score beside the best
            trial's.
    """

    algorithm: Literal["optuna", "grid"] = "optuna"
    num_samples: int = Field(16, ge=1)
    seed: int = Field(0, ge=0)
    space: dict[str, ParamSpec] = Field(default_factory=dict)
    families: dict[str, dict[str, ParamSpec]] = Field(default_factory=dict)
    grid: dict[str, list[bool | int | float | str]] = Field(default_factory=dict)
    compare_paper_default: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpec:
        if self.algorithm == "optuna":
            if self.grid:
                raise ValueError("search.grid is not used by algorithm 'optuna'; remove it")
            if self.space and self.families:
                raise ValueError("search.space and search.families: give one (families holds each family's space)")
            if not self.space and not self.families:
                raise ValueError("search.space is empty: algorithm 'optuna' needs at least one parameter "
                                 "(or search.families)")
        else:
            if self.space or self.families:
                raise ValueError("search.space / search.families are not used by algorithm 'grid'; remove them")
            if not self.grid:
                raise ValueError("search.grid is empty: algorithm 'grid' needs at least one parameter")
        unknown_families = sorted(set(self.families) - set(family_names()))
        if unknown_families:
            raise ValueError(f"search.families: unknown famil(ies) {unknown_families}; known: {list(family_names())}")
        if FAMILY_KEY in self.space:
            raise ValueError("search.space.family: search families with search.families (one sub-space each)")
        for name, space in self.families.items():
            unknown = sorted(set(space) - (tunable_keys([name]) - {FAMILY_KEY}))
            if unknown:
                raise ValueError(f"search.families.{name}: unknown parameter(s) {unknown}; tunable: "
                                 f"{sorted(tunable_keys([name]) - {FAMILY_KEY})}")
        if any(len(v) == 0 for v in self.grid.values()):
            raise ValueError("every grid parameter needs at least one value")
        return self

    def values_of(self, key: str) -> list[Any] | None:
        """All values ``key`` may take in this search, any family's (None when it is not searched)."""
        if key in self.grid:
            return list(self.grid[key])
        if key in self.space:
            return self.space[key].values()
        found = [v for space in self.families.values() if key in space for v in space[key].values()]
        return found or None


class SchedulerSpec(Section):
    """Early stopping: ASHA on meta-epochs (``max_t`` = train.meta_epochs), or none (``fifo``)."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


_PLATEAU_DEFAULTS = PlateauConfig()


class PlateauSpec(Section):
    """Per-trial plateau stopping (``bgad_core.engine.stopping``): a trial ends once its validation objective has gone
    ``patience`` meta-epochs after phase 1 without rising more than ``min_delta``, and keeps its best epoch's
    checkpoint. ASHA still prunes weak trials; this ends the survivors at their plateau. The defaults replay the
    recorded 25 x 8 curves with the selected epoch's test within 0.003 of the full runs' in a third of their
    meta-epochs (``benchmarks/bench_plateau.py``; ``bgad_core.engine.stopping.PlateauConfig`` says why these values).

    Attributes:
        enabled: stop trials at their plateau (``false``, or ``patience: 0``, trains every trial ASHA keeps to
            ``train.meta_epochs``).
        patience: meta-epochs in a row without a gain before a trial stops.
        min_delta: the rise of the validation objective that counts as a gain must exceed this.
    """

    enabled: bool = True
    patience: int = Field(_PLATEAU_DEFAULTS.patience, ge=0)
    min_delta: float = Field(_PLATEAU_DEFAULTS.min_delta, ge=0, allow_inf_nan=False)

    def rule(self) -> PlateauConfig:
        """The rule's settings for the trials (patience 0, never stopping, when disabled)."""
        return PlateauConfig(self.patience if self.enabled else 0, self.min_delta)


class SelectionSpec(Section):
    """The final choice among a category's trials (``sweeper.tuning.selection``).

    A few dozen validation images leave the best validation figure among many trials as much the luckiest as the
    best. ``reseed`` re-scores the top ``max_candidates`` trials on validation, keeps those the paired 95 % bootstrap
    interval cannot tell from the best, trains each of them again with ``seeds`` more seeds, chooses the
    configuration whose runs average highest (all but its last re-seeded run) and deploys that last run, whose
    validation figure took no part in the choice; ``argmax`` (the default: ``reseed`` bought no test accuracy over
    10 measured sweeps, for 63-72 % more trial-time) takes the best validation figure as it is.

    Attributes:
        rule: ``argmax`` or ``reseed``.
        max_candidates: trials (the best included) compared with the best on validation; at least 2.
        seeds: extra runs of each tied candidate, seeded 1..seeds (trials run with seed 0 unless the space searches
            ``seed``).
        label_free_twin: after the rule has chosen, train the chosen run's configuration once more without its
            labelled anomalies (one trial per category) and deploy that twin where validation scores it higher, so
            that labels never make the deployed model worse on validation (issue 21); a chosen run without labels
            (a one-class family, ``num_anomalies: 0``) has no twin.
    """

    rule: Literal["argmax", "reseed"] = "argmax"
    max_candidates: int = Field(3, ge=2)
    seeds: int = Field(2, ge=1)
    label_free_twin: bool = True


_BUILTIN_RESOURCES = frozenset({"cpu", "gpu", "memory", "object_store_memory"})
# What a trial can maximise: the validation metrics it reports (the keys of ``bgad_core.evaluation.metrics.compute_metrics``).
# AU-PR suits heavily imbalanced lines, where a few anomalies among many normals let AUROC flatter a detector; the mean
# of PRO and image AUROC keeps a selection on masks from trading which images are flagged for how well defects are outlined.
OBJECTIVES = ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "pixel_aupr", "pixel_f1_max", "aupro",
              PRO_AND_IMAGE_AUROC)


class TuneSpec(Section):
    """How trials run.

    Attributes:
        metric: validation metric the sweep maximises, one of ``OBJECTIVES`` with or without its ``val_`` prefix
            (``aupro``, ``image_auroc``, ``image_aupr``, ...; stored as ``val_<metric>``); ``auto`` =
            ``val_aupro_image_auroc_mean`` when every category has pixel masks, else ``val_image_auroc``.
        scheduler: early stopping of weak trials.
        plateau: early stopping of every trial once its validation objective stops gaining.
        selection: how the final choice among trials accounts for validation noise.
        max_concurrent_trials: trials running at once (one per GPU on a GPU cluster).
        cpus_per_trial, gpus_per_trial: resources of one trial (a GPU fraction packs several trials per GPU).
        custom_resources_per_trial: Ray custom resources each trial also requests, e.g. ``{trial_node: 1}`` to
            keep trials on the nodes started with ``ray start --resources '{"trial_node": N}'`` (and N trials
            per node at most).
        storage_path: Tune results and checkpoints; shared storage (s3://, gs://, NFS) on a multi-node cluster.
        max_failures: retries of a failed trial, from its last checkpoint.
        optuna_storage: RDB URL of the Optuna studies (survive restarts; readable by optuna-dashboard), without a
            password: ``postgresql+psycopg2://USER@HOST/DB`` with the password in ``PGPASSWORD`` or ``~/.pgpass``.
    """

    metric: str = "auto"
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    plateau: PlateauSpec = Field(default_factory=PlateauSpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    max_concurrent_trials: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    custom_resources_per_trial: dict[str, float] = Field(default_factory=dict)
    storage_path: Location = Field("runs/tune", min_length=1)
    max_failures: int = Field(1, ge=0)
    optuna_storage: Location = Field("sqlite:///runs/optuna.db", min_length=1)

    @field_validator("metric")
    @classmethod
    def _metric_name(cls, value: str) -> str:
        if value == "auto":
            return value
        if value.removeprefix("val_") not in OBJECTIVES:
            raise ValueError(f"must be 'auto' or a validation metric, one of {list(OBJECTIVES)} (a 'val_' prefix is "
                             "optional; test metrics never choose)")
        return f"val_{value.removeprefix('val_')}"

    @field_validator("custom_resources_per_trial")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = sorted(k for k in value if k.lower() in _BUILTIN_RESOURCES)
        if builtin:
            raise ValueError(f"{builtin}: set CPUs and GPUs with cpus_per_trial / gpus_per_trial")
        if any(amount <= 0 for amount in value.values()):
            raise ValueError("every amount must be > 0")
        return value


LOCAL_ARTIFACTS = "runs/mlartifacts"  # artifacts of a local (SQLite) tracking store


class MlflowSpec(Section):
    """Tracking: ``tracking_uri`` (None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///runs/mlflow.db``).

    ``artifact_location`` is where a new experiment stores artifacts. Unset, it is ``runs/mlartifacts`` for a local
    store and the server's own artifact store for a tracking server (``http(s)://``): trials on other nodes then
    upload through the server instead of writing to a path only one machine has.
    """

    tracking_uri: Location | None = None
    experiment: SafeName = "bgad-sweeper"
    artifact_location: Location | None = None
    log_plots: bool = True

    def artifact_location_for(self, tracking_uri: str) -> str | None:
        """The artifact location to create the experiment with, given the resolved tracking URI."""
        if self.artifact_location is not None or tracking_uri.startswith(("http://", "https://")):
            return self.artifact_location
        return LOCAL_ARTIFACTS


class SweepConfig(Section):
    """A whole sweep file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: SafeName
    datasets: list[DatasetSpec] = Field(min_length=1)
    data: DataSpec = Field(default_factory=DataSpec)
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    mode: Literal["per_category", "shared"] = "per_category"
    train: dict[str, Any] = Field(default_factory=dict)
    search: SearchSpec | None = None  # required to run a sweep; a cache-only config may leave it out
    tune: TuneSpec = Field(default_factory=TuneSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)

    def relative_locations(self, tracking_uri: str) -> list[str]:
        """``key (value)`` of every local location given as a relative path, defaults included.

        ``tracking_uri`` is the tracking store as it will be used (configured, else ``$MLFLOW_TRACKING_URI``, else
        the default), before it is made absolute.

        They resolve against the working directory, which under ``ray job submit`` is Ray's temporary copy of
        ``--working-dir``: ``sweeper/run.py`` refuses them there unless told which directory they mean.
        """
        locations = {f"datasets[{i}].path": d.path for i, d in enumerate(self.datasets) if d.path is not None}
        if self.backbone.weights not in WEIGHT_MODES:
            locations["backbone.weights"] = self.backbone.weights
        locations |= {"cache.root": self.cache.root, "tune.storage_path": self.tune.storage_path,
                      "tune.optuna_storage": self.tune.optuna_storage}
        locations["mlflow.tracking_uri"] = tracking_uri
        artifacts = self.mlflow.artifact_location_for(tracking_uri)
        if artifacts is not None:
            locations["mlflow.artifact_location"] = artifacts
        return [f"{key} ({value})" for key, value in locations.items() if _is_relative(value)]

    @model_validator(mode="after")
    def _unique_categories(self) -> SweepConfig:
        names = [d.category for d in self.datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"datasets: category names must be unique, {duplicates} repeat (set 'name')")
        return self

    @model_validator(mode="after")
    def _baseline_levels_cached(self) -> SweepConfig:
        if self.baseline.family not in family_names():
            raise ValueError(f"baseline.family: unknown detector family {self.baseline.family!r}; known: "
                             f"{list(family_names())}")
        missing = sorted(set(self.baseline.feature_strides) - set(self.backbone.strides))
        if self.baseline.enabled and missing:
            raise ValueError(f"baseline.feature_strides: {missing} not among backbone.strides {self.backbone.strides}")
        return self

    def families(self) -> list[str]:
        """The detector families this sweep trains: ``search.families``' keys, else the grid's ``family`` values,
        else ``train.family`` (default bgad)."""
        if self.search is not None and self.search.families:
            return list(self.search.families)
        if self.search is not None and FAMILY_KEY in self.search.grid:
            return [str(v) for v in self.search.grid[FAMILY_KEY]]
        return [str(self.train.get(FAMILY_KEY, DEFAULT_FAMILY))]

    @model_validator(mode="after")
    def _trainable_values(self) -> SweepConfig:
        """Every fixed and searched value must make a valid config of its family: fail at load, not in trial 7."""
        names = self.families()
        unknown_families = sorted(set(names) - set(family_names()))
        if unknown_families:
            raise ValueError(f"family: unknown detector famil(ies) {unknown_families}; known: {list(family_names())}")
        known = tunable_keys(names)
        unknown = sorted(set(self.train) - known)
        if unknown:
            raise ValueError(f"train: unknown parameter(s) {unknown} for famil(ies) {names}; known: {sorted(known)}")
        fixed = {k: v for k, v in self.train.items() if k not in (*TUNABLE_DATA_KEYS, FAMILY_KEY)}
        for name in names:
            _check_config(name, fixed, "train")
        search = self.search or SearchSpec.model_construct(space={}, grid={}, families={})
        if search.families and FAMILY_KEY in self.train:
            raise ValueError("train.family: the family is searched (search.families); remove it")
        spaces = search.families or {name: search.space for name in names}
        for name, space in spaces.items():
            unknown = sorted(set(space) - (tunable_keys([name]) - {FAMILY_KEY}))
            if unknown:
                raise ValueError(f"search.space: unknown parameter(s) {unknown} of family {name}; tunable: "
                                 f"{sorted(tunable_keys([name]) - {FAMILY_KEY})}")
            for key, spec in space.items():
                where = f"search.families.{name}.{key}" if search.families else f"search.space.{key}"
                for value in spec.values():
                    _check_param(name, fixed, key, value, where)
        for key, values in search.grid.items():
            if key == FAMILY_KEY:
                continue
            if not any(key in tunable_keys([name]) for name in names):
                raise ValueError(f"search.grid.{key}: not a parameter of famil(ies) {names}")
            for value in values:
                for name in names:
                    if key in tunable_keys([name]):
                        _check_param(name, fixed, key, value, f"search.grid.{key}")
        for key in TUNABLE_DATA_KEYS:
            if key in self.train:
                _check_param(names[0], fixed, key, self.train[key], f"train.{key}")
        return self

    @model_validator(mode="after")
    def _cache_covers_search(self) -> SweepConfig:
        """The cache must hold every (n anomalies, depth S) a trial can ask for; unset cache values follow the search.

        A sweep of one-class families only draws no training anomaly unless told: every labelled image then stays
        in validation and test, where it is the only thing that measures a detector that never reads one.
        """
        anomalies = self._values("num_anomalies")
        depths = self._values("racp_depth")
        one_class = all(family(name).learning_type == ONE_CLASS for name in self.families()
                        if name in family_names())
        if one_class and not anomalies and "max_anomalies" not in self.cache.model_fields_set:
            self.cache.max_anomalies = 0
        if anomalies:
            if "max_anomalies" not in self.cache.model_fields_set:
                self.cache.max_anomalies = max(anomalies)
            elif max(anomalies) > self.cache.max_anomalies:
                raise ValueError(f"cache.max_anomalies ({self.cache.max_anomalies}) is below num_anomalies {max(anomalies)}")
        if depths:
            if "racp_depths" not in self.cache.model_fields_set:
                self.cache.racp_depths = sorted(set(depths))
            elif not set(depths) <= set(self.cache.racp_depths):
                missing = sorted(set(depths) - set(self.cache.racp_depths))
                raise ValueError(f"cache.racp_depths {self.cache.racp_depths} lacks racp_depth value(s) {missing}")
        return self

    def _values(self, key: str) -> list[int]:
        searched = self.search.values_of(key) if self.search is not None else None
        values = searched if searched is not None else ([self.train[key]] if key in self.train else [])
        return [int(v) for v in values]


def _check_config(name: str, values: dict[str, Any], where: str) -> None:
    try:
        config_for(name, values)
    except (ConfigError, TypeError) as err:
        raise ValueError(f"{where}: {err} (family {name})") from err


def _check_param(name: str, fixed: dict[str, Any], key: str, value: Any, where: str) -> None:
    """One searched or fixed value of family ``name``, checked alone against the fixed ones."""
    if key == "num_anomalies":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: number of anomalies must be an int >= 0, got {value!r}")
    elif key == "racp_depth":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= len(TRANSFORMS):
            raise ValueError(f"{where}: augmentation depth must be an int in [0, {len(TRANSFORMS)}], got {value!r}")
    elif key in family(name).parameters():
        _check_config(name, {**fixed, key: value}, where)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects repeated keys: plain YAML silently keeps the last one, so a second ``cache:``
    section would quietly replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"repeated key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _is_relative(location: str) -> bool:
    """Whether a path, or the file of a ``sqlite:///`` URI, is relative; other URIs are not."""
    if location.startswith("sqlite:///"):
        return not location.startswith("sqlite:////")
    return "://" not in location and not Path(location).expanduser().is_absolute()


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML file; any problem is a ``ConfigError`` naming the file (and key)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so YAML errors name the file and line
            raw = yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({getattr(err, 'strerror', None) or err})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {len(err.errors())} invalid setting(s):\n" + _describe(err)) from err


def _describe(err: ValidationError) -> str:
    """One line per error: ``  key.path[0].leaf: message (got value)``."""
    lines = []
    for problem in err.errors():
        key = _dotted(problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        quiet = problem["type"] in ("missing", "extra_forbidden", SECRET_IN_URI)
        got = "" if quiet else f" (got {_short(problem['input'])})"
        lines.append(f"  {key}: {message}{got}")
    return "\n".join(lines)


def _dotted(loc: tuple[Any, ...]) -> str:
    """``("datasets", 0, "path")`` -> ``datasets[0].path``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
