"""Run settings: the app's ``[tool.flwr.app.config]`` keys, parsed and validated.

Every key is kebab-case in the run config and snake_case here. Parsing checks
names, types and ranges and raises :class:`SettingsError` naming the key, the
bad value and what is allowed, so a ServerApp can stop before round 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from resist_fl.core.aggregation import WEIGHTINGS
from resist_fl.core.allocation import ALLOCATIONS
from resist_fl.core.model import NORMS, PRESET_DEPTHS, STEMS, TORCHVISION_DEPTHS, ModelSpec
from resist_fl.core.transport import TRANSPORT_DTYPES
from resist_fl.data import AUGMENTATIONS, DATASETS, PARTITIONERS, resolve_augment
from resist_fl.data.imagefolder import IMAGE_SIZES
from resist_fl.run.settings_error import SettingsError
from resist_fl.run.tracking import TRACKERS

if TYPE_CHECKING:
    from resist_fl.core.decomposition import BlockLayout

STRATEGIES = ("resist", "fedavg")
LR_SCHEDULES = ("step", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunSettings:
    """All run-config keys with their defaults (mirrors pyproject.toml)."""

    strategy: str = "resist"
    num_server_rounds: int = 5
    model: str = "preact_resnet34"
    stage_depths: str = ""
    base_width: int = 16
    norm: str = "batchnorm"
    stem: str = "cifar"
    dataset: str = "cifar10"
    data_path: str = ""
    image_size: int = 224
    partition_cache: str = "~/.cache/resist-fl/partitions"
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_partition: int = 2
    augment: str = "auto"
    local_steps: int = 50
    local_epochs: int = 0
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "step"
    clip_grad_norm: float = 1.0
    server_lr: float = 1.0
    transport_dtype: str = "float32"
    min_blocks_per_site: int = 0
    warmup_rounds: int = 0
    allocation: str = "uniform"
    capacity_profile: str = ""
    slowdown_profile: str = ""
    eval_depths: str = ""
    inference_scaling: bool = True
    partitioned_stages: str = "3"
    weighting: str = "examples"
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_available_nodes: int = 2
    min_train_nodes: int = 2
    min_train_replies: int = 1
    max_num_examples: int = 10_000_000
    round_timeout: float = 3600.0
    eval_every: int = 1
    eval_batch_size: int = 500
    seed: int = 0
    output_dir: str = "~/resist-fl-runs"
    run_name: str = ""
    resume: bool = False
    tracker: str = "none"
    tracking_uri: str = ""
    device: str = "auto"
    amp: bool = False

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunSettings":
        """Parse a Flower run config (kebab-case keys); unknown keys are errors."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        if unknown := sorted(set(run_config) - set(known)):
            bad = ", ".join(f"{k} = {run_config[k]!r}" for k in unknown)
            raise SettingsError(f"unknown run-config key(s): {bad}; known keys: {', '.join(known)}")
        values = {}
        for key, value in run_config.items():
            field = known[key]
            values[field.name] = _coerce(key, value, type(getattr(cls, field.name)))
        settings = cls(**values)
        settings.validate()
        return settings

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case dict (what pyproject.toml holds)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def value(self, key: str) -> Any:
        """The value of a kebab-case run-config key."""
        return getattr(self, key.replace("-", "_"))

    def validate(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("model", self.model, (*PRESET_DEPTHS, *TORCHVISION_DEPTHS))
        _choice("stem", self.stem, STEMS)
        _choice("norm", self.norm, NORMS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("augment", self.augment, AUGMENTATIONS)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("transport-dtype", self.transport_dtype, TRANSPORT_DTYPES)
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("tracker", self.tracker, TRACKERS)
        parse_profile("capacity-profile", self.capacity_profile, low=0.0, high=1.0)
        parse_profile("slowdown-profile", self.slowdown_profile, low=1.0)
        self.depth_percents()
        for key in ("num-server-rounds", "base-width", "shards-per-partition", "batch-size", "eval-every",
                    "eval-batch-size", "min-available-nodes", "min-train-nodes", "min-train-replies",
                    "max-num-examples"):
            _at_least(key, self.value(key), 1)
        for key in ("local-epochs", "min-blocks-per-site", "warmup-rounds", "seed"):
            _at_least(key, self.value(key), 0)
        if self.min_train_nodes > self.min_available_nodes:
            raise SettingsError(f"min-train-nodes = {self.min_train_nodes}: expected at most "
                                f"min-available-nodes ({self.min_available_nodes})")
        if self.min_train_replies > self.min_train_nodes:
            raise SettingsError(f"min-train-replies = {self.min_train_replies}: expected at most "
                                f"min-train-nodes ({self.min_train_nodes})")
        if self.local_epochs == 0:
            _at_least("local-steps", self.local_steps, 1, "(or set local-epochs > 0)")
        for key in ("lr", "dirichlet-alpha", "round-timeout"):
            if not self.value(key) > 0:
                raise SettingsError(f"{key} = {self.value(key)!r}: expected a positive number")
        if not self.server_lr > 0:
            raise SettingsError(f"server-lr = {self.server_lr!r}: expected a positive number (1.0: the plain merge)")
        for key in ("momentum", "weight-decay", "clip-grad-norm"):
            if not self.value(key) >= 0:
                raise SettingsError(f"{key} = {self.value(key)!r}: expected a number >= 0")
        if not 0 < self.fraction_train <= 1:
            raise SettingsError(f"fraction-train = {self.fraction_train!r}: expected a value in (0, 1]")
        if not 0 <= self.fraction_evaluate <= 1:
            raise SettingsError(f"fraction-evaluate = {self.fraction_evaluate!r}: expected a value in [0, 1]")
        if self.strategy == "resist" and self.fraction_evaluate > 0:
            raise SettingsError(f"fraction-evaluate = {self.fraction_evaluate!r}: ResIST evaluates "
                                "centrally only (its clients hold sub-networks); expected 0.0")
        if self.dataset == "npz" and not self.data_path:
            raise SettingsError("data-path = '': dataset 'npz' needs the absolute path of a .npz file")
        if self.dataset == "imagefolder" and not self.data_path:
            raise SettingsError("data-path = '': dataset 'imagefolder' needs the absolute path of a directory "
                                "holding train/<class>/... and val/<class>/...")
        if not IMAGE_SIZES[0] <= self.image_size <= IMAGE_SIZES[1]:
            raise SettingsError(f"image-size = {self.image_size}: expected {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} "
                                "pixels (the crop imagefolder images are trained and evaluated at)")
        self.model_spec(num_classes=10, in_channels=3)
        self.stages()

    def model_spec(self, num_classes: int, in_channels: int) -> ModelSpec:
        """The model to build; ``stage-depths`` overrides the preset's depths. A torchvision
        ResNet has torchvision's depths and width (``base-width`` does not apply to it)."""
        if self.model in TORCHVISION_DEPTHS:
            if self.stage_depths:
                raise SettingsError(f"stage-depths = {self.stage_depths!r}: {self.model} has torchvision's "
                                    f"depths {TORCHVISION_DEPTHS[self.model]}; expected ''")
            return ModelSpec(depths=TORCHVISION_DEPTHS[self.model], num_classes=num_classes, in_channels=in_channels,
                             base_width=64, norm=self.norm, arch=self.model, stem=self.stem)
        depths = PRESET_DEPTHS[self.model]
        if self.stage_depths:
            try:
                depths = tuple(int(d) for d in self.stage_depths.split(","))
            except ValueError:
                depths = ()
            if len(depths) != 4 or min(depths) < 1:
                raise SettingsError(f"stage-depths = {self.stage_depths!r}: expected four positive "
                                    "integers separated by commas, e.g. '1,1,4,1'")
        return ModelSpec(depths=depths, num_classes=num_classes, in_channels=in_channels,
                         base_width=self.base_width, norm=self.norm, stem=self.stem)

    def depth_percents(self) -> tuple[int, ...]:
        """``eval-depths`` as sorted integer percentages of the partitionable blocks."""
        try:
            percents = tuple(sorted({int(p) for p in self.eval_depths.split(",")})) if self.eval_depths else ()
        except ValueError:
            percents = (0,)
        if any(not 0 < p <= 100 for p in percents):
            raise SettingsError(f"eval-depths = {self.eval_depths!r}: expected percentages in (0, 100] separated "
                                "by commas, e.g. '25,50,100', or '' for none")
        return percents

    def crop_size(self) -> int | None:
        """The side of the training batches' images: ``image-size`` for ``imagefolder`` (stored
        larger, see :mod:`resist_fl.data.imagefolder`), else the stored size (None)."""
        return self.image_size if self.dataset == "imagefolder" else None

    def augmentation(self) -> str:
        """The training augmentation, ``auto`` resolved for the data set."""
        return resolve_augment(self.augment, self.dataset)

    def stages(self) -> tuple[int, ...]:
        """The partitioned stages as integers."""
        try:
            stages = tuple(sorted({int(s) for s in self.partitioned_stages.split(",")}))
        except ValueError:
            stages = ()
        if not stages or not set(stages) <= {1, 2, 3, 4}:
            raise SettingsError(f"partitioned-stages = {self.partitioned_stages!r}: expected stage "
                                "numbers 1-4 separated by commas, e.g. '3' or '2,3,4'")
        return stages


def parse_profile(key: str, text: str, *, low: float, high: float | None = None) -> tuple[float, ...]:
    """A per-partition profile such as ``"1.0,0.5,0.25"``; values in ``(low, high]`` for a
    capacity (``high`` given), ``>= low`` otherwise; ``""`` is the empty profile."""
    if not text:
        return ()
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    ok = values and all((low < v <= high) if high is not None else (v >= low) for v in values)
    if not ok:
        wanted = f"numbers in ({low:g}, {high:g}]" if high is not None else f"numbers >= {low:g}"
        raise SettingsError(f"{key} = {text!r}: expected {wanted} separated by commas, one per partition id "
                            "(cycled over the nodes), e.g. '1.0,0.5,0.25,0.25'")
    return values


def profile_value(profile: tuple[float, ...], partition_id: int, default: float = 1.0) -> float:
    """A profile's value for ``partition_id`` (cycled), ``default`` for an empty profile."""
    return profile[partition_id % len(profile)] if profile else default


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise SettingsError(f"{key} = {value!r}: expected a value of type {expected.__name__}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(f"{key} = {value!r}: expected one of {', '.join(allowed)}")


def _at_least(key: str, value: int, low: int, hint: str = "") -> None:
    if value < low:
        raise SettingsError(f"{key} = {value!r}: expected an integer >= {low} {hint}".rstrip())


def resolve_model(settings: RunSettings) -> tuple[ModelSpec, "BlockLayout"]:
    """Model spec (classes and channels from the dataset) and block layout of a run."""
    from resist_fl.core.decomposition import BlockLayout
    from resist_fl.data import dataset_info

    info = dataset_info(settings.dataset, settings.data_path, settings.image_size)
    spec = settings.model_spec(num_classes=info.num_classes, in_channels=info.in_channels)
    try:
        layout = BlockLayout.from_spec(spec, settings.stages())
    except ValueError as err:
        raise SettingsError(f"partitioned-stages = {settings.partitioned_stages!r} with stage depths "
                            f"{spec.depths}: {err}") from err
    if settings.min_blocks_per_site > len(layout.partitionable):
        raise SettingsError(f"min-blocks-per-site = {settings.min_blocks_per_site}: expected at most "
                            f"{len(layout.partitionable)}, the number of partitionable blocks")
    return spec, layout
