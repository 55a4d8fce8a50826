"""Run settings: the app's ``[tool.flwr.app.config]`` keys, declared with pydantic.

Every key is a field of :class:`RunSettings`: kebab-case in the run config (its alias),
snake_case here, with its type, its allowed values (``Literal``) or range (field constraints)
and its description, from which the documentation's run-config table is generated
(:func:`run_config_table`, ``python -m resist_fl.run.settings --write docs/run-config.md``). Unknown keys
are forbidden; cross-key rules are validators. Every failure is a :class:`SettingsError` naming
the key, the bad value and what is allowed, so a ServerApp can stop before round 1.
"""

from __future__ import annotations

import math

import argparse
import re
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      model_validator)

from resist_fl.core.aggregation import WEIGHTINGS
from resist_fl.core.allocation import ALLOCATIONS
from resist_fl.core.decomposition import BlockLayout
from resist_fl.core.model import PRESET_DEPTHS, STEMS, ModelSpec
from resist_fl.core.model_cost import CAPACITY_MEASURES
from resist_fl.core.norms import NORMS
from resist_fl.core.torchvision_resnets import TORCHVISION_DEPTHS
from resist_fl.core.transport import TRANSPORT_DTYPES
from resist_fl.core.width_slicing import layer_rates, whole_channels
from resist_fl.data import AUGMENTATIONS, DATASETS, PARTITIONERS, dataset_info, resolve_augment
from resist_fl.data.idx import IDX_DATASETS
from resist_fl.data.imagefolder import IMAGE_SIZES
from resist_fl.run.methods import LOCAL_DP, METHODS, STRATEGIES, keys_read_by_some, readers
from resist_fl.run.settings_error import SettingsError
from resist_fl.run.tracking import TRACKERS, TrackerUnavailable, require_tracker

LR_SCHEDULES = ("step", "cosine", "constant")
BN_STATISTICS = ("batch", "training-data")
DP_MODES = ("none", "central", "local")
DP_SAMPLING = ("public", "secret")
DEVICES = ("auto", "cpu", "cuda")
CAPACITY_MODES = ("fixed", "dynamic")
OVER_BUDGET = ("train", "skip")
CHANNELS = "channels"
LAYERS = "layers"
"""``width-rates``: every channel count (each node's largest width within its budget)."""
MODELS = (*PRESET_DEPTHS, *TORCHVISION_DEPTHS)
TORCHVISION_WIDTH = 64
"""torchvision's ResNets' first-stage width (``base-width`` does not change it)."""


def _whole_number(value: Any) -> Any:
    """An integral float (TOML's ``5.0``) as an int; anything else unchanged (then checked)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number(value: Any) -> Any:
    """An int as a float (``lr=1``); a bool stays a bool, and is refused."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


Int = Annotated[int, BeforeValidator(_whole_number), Strict()]
Float = Annotated[float, BeforeValidator(_number), Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


def _as_given(value: Any) -> Any:
    """A bool or a string unchanged; anything else (``1``, ``1.0``) as its text, so that a ``Literal``
    of bools refuses it instead of coercing it."""
    return value if isinstance(value, (bool, str)) else repr(value)


Amp = Annotated[Literal["auto", True, False], BeforeValidator(_as_given)]
_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


def kebab(name: str) -> str:
    return name.replace("_", "-")


class RunSettings(BaseModel):
    """All run-config keys with their defaults (those of pyproject.toml, checked by a test)."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=kebab, populate_by_name=True)

    strategy: Literal[STRATEGIES] = Field('resist',
        description="; ".join(f"`{m.name}` ({m.summary})" for m in METHODS.values())
        + " ([Heterogeneous clients](heterogeneous.md#heterogeneous-clients-capacities-stragglers-link-speeds))")
    num_server_rounds: Int = Field(5, ge=1,
        description="rounds")
    model: Literal[MODELS] = Field('preact_resnet34',
        description="`preact_resnet18/34/101/152/200` (basic pre-activation blocks, depths 2-2-2-2 / 3-4-6-3 / 3-4-23-3 / 3-4-36-3 / 3-4-50-3), or torchvision's post-activation `torchvision_resnet18/34/50/101/152` (torchvision's depths and width 64; `base-width` and `stage-depths` do not apply; see [Your own ResNet](own-model.md#your-own-resnet))")
    stage_depths: Str = Field('',
        description="four comma-separated depths overriding the preset, e.g. `\"1,1,4,1\"`")
    base_width: Int = Field(16, ge=1,
        description="channels of the first stage (the paper: 64)")
    norm: Literal[NORMS] = Field('batchnorm',
        description="`batchnorm` (the paper: batch statistics also at test time), `batchnorm-running`, `groupnorm`")
    head_norm: Bool = Field(False,
        description="`preact_resnet*`: a norm and a ReLU between the last stage and the pooling (HeteroFL's pre-activation ResNet has them; the ResIST paper's model has none); every method trains the same model")
    stem: Literal[STEMS] = Field('cifar',
        description="`cifar`: 3x3 stride-1 stem for 32x32 inputs; `imagenet`: 7x7 stride-2 conv + norm + ReLU + 3x3 max-pool for 224x224 inputs (both families; see [ImageNet-sized runs](imagenet.md#imagenet-sized-runs-warm-up-and-the-imagenet-stem))")
    dataset: Literal[DATASETS] = Field('digits',
        description="`digits` (scikit-learn's bundled 8x8 handwritten digits: real images, offline; the default job), `fashion-mnist`, `mnist` (the original 28x28 IDX files: from `data-path`, torchvision's `FashionMNIST/raw` / `MNIST/raw` under it, Debian's `dataset-fashion-mnist` package, else the hub), `cifar10`, `cifar100` (hub), `synthetic` (made in code, offline), `npz` (local file), `imagefolder` (a local ImageNet-style directory, see [ImageNet-sized runs](imagenet.md#imagenet-sized-runs-warm-up-and-the-imagenet-stem))")
    data_path: Str = Field('',
        description="absolute path of the `.npz` for `dataset='npz'`, of the directory holding the IDX files (or torchvision's root) for `fashion-mnist` / `mnist`, or of the directory (`train/<class>/...`, `val/<class>/...`) for `dataset='imagefolder'`, or `hf:<hub dataset id>[@<config>]` for the same from the Hugging Face hub")
    image_size: Int = Field(224, ge=IMAGE_SIZES[0], le=IMAGE_SIZES[1],
        description="`imagefolder` only: the crop size the model sees (training: random-resized crops; evaluation: resize to `image-size * 256/224` + centre crop)")
    partition_cache: Str = Field('~/.cache/resist-fl/partitions',
        description="node-local directory where each node keeps its decoded training partition (`.npy`, memory-mapped by later ClientApp processes); a node's own `--node-config \"partition-cache='/fast/disk'\"` wins; `\"\"` turns it off")
    partitioner: Literal[PARTITIONERS] = Field('iid',
        description="flwr-datasets partitioners: `iid`, `dirichlet` (label skew), `shard` (pathological non-IID: the label-sorted set cut into equal shards, `shards-per-partition` per node, so a few labels each), `linear` / `square` / `exponential` (IID labels, node i's share in proportion to i+1, (i+1)², e^(i+1))")
    dirichlet_alpha: Float = Field(0.5, gt=0,
        description="concentration of the Dirichlet partitioner")
    shards_per_partition: Int = Field(2, ge=1,
        description="`shard`: shards per node")
    augment: Literal[AUGMENTATIONS] = Field('auto',
        description="training augmentation: `auto` (`crop-flip` for `cifar10`/`cifar100`/`synthetic`, `resized-crop-flip` for `imagefolder`, `none` for `npz`/`digits`/`fashion-mnist`/`mnist`: a user's own images, handwriting and fashion items are neither CIFAR nor mirror-symmetric), `none`, `crop` (random crop after padding by 1/8 of the side), `flip` (horizontal), `crop-flip`, `resized-crop` / `resized-crop-flip` (torchvision's `RandomResizedCrop`: 8-100 % of the area, aspect 3/4-4/3, resized to the image size)")
    local_steps: Int = Field(50, ge=0,
        description="local SGD steps per round (the paper's *l* = 50)")
    local_epochs: Int = Field(0, ge=0,
        description="if > 0, train this many local epochs instead")
    batch_size: Int = Field(64, ge=1,
        description="local batch size (the paper: 128)")
    lr: Float = Field(0.05, gt=0,
        description="SGD learning rate (before the schedule); a fresh optimiser every round, as in the official code")
    momentum: Float = Field(0.9, ge=0,
        description="SGD momentum")
    weight_decay: Float = Field(0.0005, ge=0,
        description="SGD weight decay")
    lr_schedule: Literal[LR_SCHEDULES] = Field('step',
        description="`step` (÷10 at 50 % and 75 % of the rounds), `cosine`, `constant`")
    clip_grad_norm: Float = Field(1.0, ge=0,
        description="if > 0, each local step's gradient is rescaled to at most this L2 norm (every strategy); keeps label-skewed runs from diverging ([Non-IID](noniid.md#non-iid-data-label-skew)); `0`: off, as in the paper presets")
    server_lr: Float = Field(1.0, gt=0,
        description="server step: the global model moves this fraction of the way to the merge (`1.0`: the plain merge; `resist`, `depth-prefix`, `depthfl`, `fedavg`, `fedavg-small`; the width-sliced baselines merge as their code does and refuse it)")
    transport_dtype: Literal[TRANSPORT_DTYPES] = Field('float32',
        description="how float arrays travel in training messages and replies, every strategy: `float32`, `float16` (saturating), `uint8` (per-tensor affine 8-bit); the server decodes, merges and keeps the global model in float32")
    min_blocks_per_site: Int = Field(0, ge=0,
        description="`resist`: minimum depth *m* of a sub-ResNet (blocks are then shared by several clients)")
    warmup_rounds: Int = Field(0, ge=0,
        description="ResIST: the first k rounds train the full model as FedAvg (full model to every sampled node, weighted mean), then sub-ResNets from round k+1 (the paper's ImageNet recipe; `phase` column); `resist` and `depth-prefix` only (the other methods refuse it)")
    allocation: Literal[ALLOCATIONS] = Field('uniform',
        description="`resist`: blocks per node: `uniform` (equal depths, the paper), `capacity` (in proportion to node capacity), `speed` (in proportion to measured blocks per second); always within each node's capacity ([Heterogeneous clients](heterogeneous.md#heterogeneous-clients-capacities-stragglers-link-speeds))")
    capacity_measure: Literal[CAPACITY_MEASURES] = Field('flops',
        description="what a node's capacity is a fraction of: `flops` (forward + backward FLOPs per sample of what it is sent, measured), `params`, or `blocks` (ResIST's partitionable blocks); every method gives a node the largest sub-model of its kind within it")
    width_rates: Str = Field('layers',
        description="`heterofl` / `fedrolex` / `fedavg-small`: the widths a node may get, the largest whose measured cost fits its capacity (within a relative tolerance of 1e-9): `layers` (HeteroFL's code's per-layer rule: a rate r keeps ceil(r x C) of every stage's C channels, and every r = k / (the widest stage's channels) is a width, so a node uses nearly all of its budget), `channels` (every channel count of the first stage, 1 .. `base-width`, the later stages in the model's ratios: the default until the study's `layers` ablation) or rates in (0, 1] separated by commas, each rounded to whole first-stage channels (HeteroFL's grid: `1,0.5,0.25,0.125,0.0625`)")
    label_split: Bool = Field(True,
        description="`heterofl` / `fedrolex`: their codes' label split (on in both by default): a node masks the logits of the labels its data lacks (set to 0, as their code does, before the cross-entropy) and says which labels it holds, and each classifier row is merged over the nodes holding that label only; refused under `dp` (the label sets would be released and steer the merge)")
    fedrolex_overlap: Str = Field('',
        description="`fedrolex`: its code's `overlap` option: `\"\"` (its default: one window for every node, advancing one channel per round) or a number in [0, 1]: a random channel order per round, and each node's window shifted from the previous node's by `floor(L x (1 - overlap)) + 1` of its `L` channels")
    fjord_levels: Str = Field('0.2,0.4,0.6,0.8,1.0',
        description="`fjord` / `fjord-kd`: FjORD's width levels p in (0, 1] (its paper's and code's 0.2 .. 1.0); a node's maximum level is the largest whose measured cost fits its capacity, and every local batch trains a level drawn uniformly from those at or below it")
    depthfl_distill: Bool = Field(True,
        description="`depthfl`: mutual self-distillation between the exits a node holds (its code's `kd`, on by default; the weight ramps up over the first 30 % of the rounds, as its code over 300 of 1000); `false`: cross-entropy on every exit only")
    feddyn_alpha: Float = Field(0.0, ge=0,
        description="`depthfl`: FedDyn's coefficient alpha, the server optimiser DepthFL's code runs by default (its `feddyn=true`, `alpha=0.1`): each node adds FedDyn's dynamic regulariser to its loss and keeps its state across rounds, and the server corrects the merge with its own; `0` (the default): the FedAvg merge every method here uses (their \"DepthFL (FedAvg)\" row, which also turns distillation off: `depthfl-distill=false`). Not with `dp`, `resume` or a `server-lr` other than 1 (its state is in the nodes' and the server's memory, not in the checkpoint)")
    capacity_profile: Str = Field('',
        description="simulation: node capacities in (0, 1] by partition id, cycled, e.g. `\"1.0,0.5,0.25,0.25\"` (a node's own `capacity` node config wins; none: 1.0)")
    capacity_mode: Literal[CAPACITY_MODES] = Field('fixed',
        description="`fixed`: a node keeps its capacity (node config, else its `capacity-profile` entry); `dynamic`: the server draws every sampled node's capacity anew each round from `capacity-profile` (each entry equally likely; reproducible from `seed`, round and partition), HeteroFL's and FedRolex's dynamic setting")
    over_budget: Literal[OVER_BUDGET] = Field('train',
        description="a sampled node whose budget is below the smallest sub-model the strategy can give (ResIST: the shared layers and its heaviest block; a width method: its smallest width; DepthFL: the first stage and its exit; FedAvg: its model): `train` (it trains that sub-model over its budget; `nodes.jsonl`'s `over-capacity` and the report's budget table count it) or `skip` (it is sent nothing that round and the strategy plans the round over the others: every method stays within every budget, and a node it can never serve never trains; round metric `skipped-over-budget`; not with `warmup-rounds`)")
    slowdown_profile: Str = Field('',
        description="simulation: training slowdown factors >= 1 by partition id, cycled (a simulated straggler sleeps the extra time, reported as `simulated-seconds`)")
    eval_depths: Str = Field('',
        description="e.g. `\"25,50,100\"`: also evaluate the global model truncated to these percentages of the partitionable blocks (`accuracy-depth-<pct>`; one more test-set evaluation each); `\"\"`: off")
    inference_scaling: Bool = Field(True,
        description="`resist`: scale partitioned blocks by the fraction a sub-ResNet holds at test time (max(1/S, m/P))")
    partitioned_stages: Str = Field('3',
        description="stages whose blocks (after the first, strided one) are dealt out, e.g. `\"2,3,4\"`")
    weighting: Literal[WEIGHTINGS] = Field('examples',
        description="merge weights: `examples` or `uniform` (the official code's plain mean)")
    fraction_train: Float = Field(1.0, gt=0, le=1,
        description="fraction of connected nodes sampled per round, in (0, 1]")
    fraction_evaluate: Float = Field(0.0, ge=0, le=1,
        description="`fedavg` and `fedavg-small` only: federated evaluation of the global model on each sampled client's share of the test set (or its own `.npz` test split), written as `client-eval-acc`/`-loss`; the sub-model methods' clients hold sub-networks, so they evaluate centrally only; refused under `dp` (it releases node data no noise covers)")
    min_available_nodes: Int = Field(2, ge=1,
        description="wait for at least this many connected nodes before sampling")
    min_train_nodes: Int = Field(2, ge=1,
        description="sample at least this many nodes per round (at most min-available-nodes)")
    min_train_replies: Int = Field(1, ge=1,
        description="fewer valid replies leave the global model unchanged for the round")
    max_num_examples: Int = Field(10_000_000, ge=1,
        description="replies claiming more examples are rejected")
    round_timeout: Float = Field(3600.0, gt=0,
        description="seconds to wait for replies each round")
    eval_every: Int = Field(1, ge=1,
        description="evaluate the global model every N rounds (and after the last)")
    eval_batch_size: Int = Field(500, ge=1,
        description="central evaluation batch size")
    eval_subset: Int = Field(0, ge=0,
        description="if > 0, every evaluated round but the last evaluates the global model on this many test images (a fixed random subset drawn from `seed`), the last on the whole test set; each row's `eval-images` says which; `0`: the whole test set every time")
    validation_size: Int = Field(0, ge=0,
        description="if > 0, hold this many training images out (a fixed draw, the same for every seed and node, at most half of the set): the nodes train on the rest, and every evaluation (central, per client, per tier, a node's own) uses the held-out images where it would use the test set, which the run then never evaluates on; how a learning-rate grid picks without the test set (`tuning: {validation-size: N}`); `0`: no hold-out")
    bn_statistics: Literal[BN_STATISTICS] = Field('batch',
        description="central evaluation with `norm='batchnorm'`: `batch` (each test batch's own statistics, the paper's model) or `training-data` (HeteroFL's static BatchNorm: before each evaluation the global model's statistics are re-estimated over the whole training set, un-augmented, a cumulative average; width, depth and client-tier accuracies keep batch statistics; the report says which)")
    client_eval: Bool = Field(False,
        description="simulation: at every round evaluated on the whole test set, also each client's accuracy on its label distribution's share of the test set (its partition's label mix weighting the global model's per-label test accuracy), every client of the run's split, sampled or not; rows gain `client-accuracy-mean`, `-worst10` (mean of the lowest 10 %), `-min`, `-std` ([Heterogeneous clients](heterogeneous.md#per-client-accuracy))")
    target_accuracy: Float = Field(0.0, ge=0, le=1,
        description="if > 0, stop after the first evaluated round whose accuracy reaches it (`target-reached-round` in `summary.json`): time-to-target studies stop paying for rounds after the answer")
    seed: Int = Field(0, ge=0, lt=2**32,
        description="model init, node sampling, decomposition, data order")
    output_dir: Str = Field('~/resist-fl-runs',
        description="absolute (or `~`) directory for run directories")
    run_name: Str = Field('',
        description="run directory name (default: UTC time + strategy)")
    resume: Bool = Field(False,
        description="continue `run-name` from its last checkpoint")
    tracker: Literal[TRACKERS] = Field('none',
        description="also send every metrics row to `tensorboard` or `mlflow` ([Experiment tracking](getting-started.md#experiment-tracking))")
    tracking_uri: Str = Field('',
        description="`mlflow`: the tracking store or server; `\"\"`: `<run dir>/mlflow.db`")
    device: Literal[DEVICES] = Field('auto',
        description="`auto` (CUDA when visible), `cpu`, `cuda`")
    dp: Literal[DP_MODES] = Field('none',
        description=f"differential privacy ([Privacy](privacy.md)): `central` (client-level: nodes clip their update to `dp-clip`, the server adds noise `dp-noise-multiplier x dp-clip / h` to each parameter merged over h holders and accounts epsilon), `local` (DP-SGD on every node with Opacus; needs `norm='groupnorm'`; the strategies whose nodes train one model "
        f"by plain SGD: {', '.join(f'`{m}`' for m in LOCAL_DP)}), `none`; `central` wraps any strategy")
    dp_clip: Float = Field(1.0, gt=0,
        description="`central`: the L2 bound of a node's update (trained minus received arrays); `local`: Opacus' per-sample gradient bound")
    dp_noise_multiplier: Float = Field(1.0, gt=0,
        description="`central`: noise std over `dp-clip` on the sum of the clipped updates; `local`: Opacus' noise multiplier")
    dp_delta: Float = Field(1e-05, gt=0, lt=1,
        description="the delta epsilon is reported at (`epsilon` in every `metrics.jsonl` row under `central`, `dp-epsilon` per node under `local`)")
    dp_target_epsilon: Float = Field(0.0, ge=0,
        description="`central`: if > 0, stop before the round whose release would take the planning bound past it (`epsilon-every-round`: a node in every round under `public` sampling; `stopped-by` in `summary.json`)")
    dp_sampling: Literal[DP_SAMPLING] = Field('public',
        description="`central`: `public` (participants follow from `seed` and are written to `nodes.jsonl`: no amplification, each node's epsilon composes the rounds it was in, add/remove-one-node) or `secret` (participants drawn from OS entropy and written nowhere: the amplified accountant, n of N without replacement, replace-one-node) ([Privacy](privacy.md#what-is-accounted))")
    dp_clip_quantile: Float = Field(0.0, ge=0, lt=1,
        description="`central`: 0 keeps `dp-clip` fixed; in (0, 1) adaptive clipping (Andrew et al., NeurIPS 2021) moves the clip towards this quantile of the node update norms through a noised count, its cost accounted ([Privacy](privacy.md#adaptive-clipping))")
    dp_clip_lr: Float = Field(0.2, gt=0,
        description="adaptive clipping: the geometric learning rate eta of `C <- C exp(-eta (b - quantile))`")
    dp_clip_count_noise: Float = Field(0.0, ge=0,
        description="adaptive clipping: std of the noise on the count of nodes below the clip; `0`: the first round's sample size / 20 (Andrew et al.)")
    privacy_min_holders: Int = Field(1, ge=1,
        description="`resist`: deal every partitionable block to at least this many sampled nodes (within capacities); `exposed-fraction` counts updates merged over fewer than max(2, this) nodes")
    privacy_strict: Bool = Field(False,
        description="with `privacy-min-holders` > 1: a round whose capacities cannot meet it is not sent (else it is sent with a WARNING)")
    device_cache_mb: Int = Field(2048, ge=0,
        description="most MiB of decoded training partitions a ClientApp process keeps on its training device (several processes may share a GPU); partitions beyond it stay in pinned host memory; `device-cache-mb` in each reply")
    amp: Amp = Field('auto',
        description="`auto`: bfloat16 autocast where the device computes bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32; `true`: bf16 autocast anyway; `false`: fp32. Training and evaluation, on the nodes and in the server's evaluation (loss and argmax in fp32); each node decides for its own device, logs the precision (`bf16 autocast` or `fp32`) and reports it (`precision` in `nodes.jsonl`; not under `dp`, whose replies carry only the update and privacy figures); `dp='local'` trains in fp32 (Opacus), so `auto` means fp32 there and `true` is refused ([Performance](performance.md#notes-on-each-figure))")

    # -- parsing ------------------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunSettings":
        """Parse a Flower run config (kebab-case keys); any bad key or value is a SettingsError."""
        if unknown := sorted(set(run_config) - {kebab(n) for n in cls.model_fields}):
            bad = ", ".join(f"{k} = {run_config[k]!r}" for k in unknown)
            raise SettingsError(f"unknown run-config key(s): {bad}; known keys: "
                                f"{', '.join(kebab(n) for n in cls.model_fields)}")
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as err:
            raise SettingsError(_explain(err.errors()[0], run_config)) from None

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case dict (what pyproject.toml holds)."""
        return self.model_dump(by_alias=True)

    def value(self, key: str) -> Any:
        """The value of a kebab-case run-config key."""
        return getattr(self, key.replace("-", "_"))

    @model_validator(mode="after")
    def _cross_key_rules(self) -> "RunSettings":
        self.capacities()
        if self.capacity_mode == "dynamic" and not self.capacity_profile:
            raise SettingsError("capacity-mode = 'dynamic': the server draws capacities from capacity-profile, which is "
                                "empty; set capacity-profile, e.g. \"1.0,0.5,0.25\"")
        parse_profile("slowdown-profile", self.slowdown_profile, low=1.0)
        self.depth_percents()
        if self.min_train_nodes > self.min_available_nodes:
            raise SettingsError(f"min-train-nodes = {self.min_train_nodes}: expected at most "
                                f"min-available-nodes ({self.min_available_nodes})")
        if self.min_train_replies > self.min_train_nodes:
            raise SettingsError(f"min-train-replies = {self.min_train_replies}: expected at most "
                                f"min-train-nodes ({self.min_train_nodes})")
        if self.local_epochs == 0 and self.local_steps < 1:
            raise SettingsError(f"local-steps = {self.local_steps!r}: expected an integer >= 1 (or set local-epochs > 0)")
        method = METHODS[self.strategy]
        for key in keys_read_by_some():
            if key not in method.reads and self.value(key) != type(self).model_fields[key.replace("-", "_")].default:
                raise SettingsError(f"{key} = {self.value(key)!r}: strategy {self.strategy!r} does not use it "
                                    f"(only {', '.join(readers(key))} do); remove it from the run config")
        if not method.federated_evaluation and self.fraction_evaluate > 0:
            raise SettingsError(f"fraction-evaluate = {self.fraction_evaluate!r}: {method.label} evaluates "
                                "centrally only (its clients hold sub-networks); expected 0.0")
        self.rates()
        self.fjord_rates()
        self.rolex_overlap()
        if self.dataset == "npz" and not self.data_path:
            raise SettingsError("data-path = '': dataset 'npz' needs the absolute path of a .npz file")
        if self.dataset == "imagefolder" and not self.data_path:
            raise SettingsError("data-path = '': dataset 'imagefolder' needs the absolute path of a directory "
                                "holding train/<class>/... and val/<class>/...")
        if self.feddyn_alpha > 0 and (self.dp != "none" or self.resume or self.server_lr != 1.0):
            bad = next(k for k, on in (("dp", self.dp != "none"), ("resume", self.resume), ("server-lr", True)) if on)
            raise SettingsError(f"{bad} = {self.value(bad)!r} with feddyn-alpha = {self.feddyn_alpha}: FedDyn keeps "
                                "state in the nodes' and the server's memory (not in a checkpoint) and is its own server "
                                "step; expected dp='none', resume=false and server-lr=1.0, or feddyn-alpha=0")
        if self.over_budget == "skip" and self.warmup_rounds:
            raise SettingsError(f"over-budget = 'skip' with warmup-rounds = {self.warmup_rounds}: a warm-up round "
                                "sends the full model, so it would skip every node below capacity 1; expected "
                                "warmup-rounds = 0 or over-budget = 'train'")
        if self.resume and not self.run_name:
            raise SettingsError("resume = True: needs run-name, the name of the run directory to continue")
        if METHODS[self.strategy].preact_only and self.model in TORCHVISION_DEPTHS:
            raise SettingsError(f"model = {self.model!r}: {self.strategy} builds on the pre-activation family "
                                "(slices its channels or adds exits); expected a preact_resnet* model")
        self.model_spec(num_classes=10, in_channels=3)
        self.stages()
        self._unused_keys()
        self._privacy_rules()
        return self

    def _unused_keys(self) -> None:
        """A key set (to other than its default) where the run's other settings leave it unread is an error."""
        preact = self.model not in TORCHVISION_DEPTHS
        central, adaptive = self.dp == "central", self.dp == "central" and self.dp_clip_quantile > 0
        data_path_read = self.dataset in ("npz", "imagefolder", *IDX_DATASETS)
        read_when = {  # key: (read by this run, when it is read, what this run has instead)
            "data-path": (data_path_read, "dataset 'npz', 'imagefolder', " + ", ".join(map(repr, IDX_DATASETS)),
                          f"dataset = {self.dataset!r}"),
            "image-size": (self.dataset == "imagefolder", "dataset='imagefolder'", f"dataset = {self.dataset!r}"),
            "dirichlet-alpha": (self.partitioner == "dirichlet", "partitioner='dirichlet'",
                                f"partitioner = {self.partitioner!r}"),
            "shards-per-partition": (self.partitioner == "shard", "partitioner='shard'",
                                     f"partitioner = {self.partitioner!r}"),
            "tracking-uri": (self.tracker == "mlflow", "tracker='mlflow'", f"tracker = {self.tracker!r}"),
            "local-steps": (self.local_epochs == 0, "local-epochs = 0 (whole epochs replace the steps)",
                            f"local-epochs = {self.local_epochs}"),
            "base-width": (preact or self.base_width == TORCHVISION_WIDTH, "a preact_resnet* model (torchvision's "
                           f"width is {TORCHVISION_WIDTH}, which is accepted)", f"model = {self.model!r}"),
            "head-norm": (preact, "a preact_resnet* model (torchvision's have no head norm)", f"model = {self.model!r}"),
            **{key: (self.dp != "none", "dp='central' or 'local'", f"dp = {self.dp!r}")
               for key in ("dp-clip", "dp-noise-multiplier", "dp-delta")},
            **{key: (central, "dp='central'", f"dp = {self.dp!r}")
               for key in ("dp-sampling", "dp-clip-quantile", "dp-target-epsilon")},
            **{key: (adaptive, "dp='central' with dp-clip-quantile > 0 (adaptive clipping)",
                     f"dp = {self.dp!r}, dp-clip-quantile = {self.dp_clip_quantile}")
               for key in ("dp-clip-lr", "dp-clip-count-noise")},
            "privacy-strict": (self.privacy_min_holders > 1, "privacy-min-holders > 1",
                               f"privacy-min-holders = {self.privacy_min_holders}"),
            "clip-grad-norm": (self.dp != "local" or self.clip_grad_norm == 0, "dp other than 'local' (DP-SGD clips "
                               "per-sample gradients at dp-clip instead; 0, off, is accepted)", "dp = 'local'"),
        }
        for key, (read, when, instead) in read_when.items():
            if not read and self.value(key) != type(self).model_fields[key.replace("-", "_")].default:
                raise SettingsError(f"{key} = {self.value(key)!r}: read only with {when}, and this run has {instead}; "
                                    "remove it from the run config")

    def _privacy_rules(self) -> None:
        if self.dp != "none" and self.dp not in METHODS[self.strategy].dp:
            supported = ", ".join(m.name for m in METHODS.values() if self.dp in m.dp)
            raise SettingsError(f"dp = {self.dp!r}: supported with strategy {supported}; "
                                f"got strategy {self.strategy!r}")
        if self.dp == "central" and self.weighting != "uniform":
            raise SettingsError(f"weighting = {self.weighting!r}: dp='central' needs 'uniform' (example weights "
                                "would change a node's sensitivity)")
        if self.dp == "central" and self.transport_dtype != "float32":
            raise SettingsError(f"transport-dtype = {self.transport_dtype!r}: dp='central' needs 'float32' "
                                "(a quantised update would not keep its clipped norm)")
        if self.dp != "none" and self.label_split and "label-split" in METHODS[self.strategy].reads:
            raise SettingsError(f"label-split = true: under dp the nodes' label sets would be released and steer "
                                f"the merge; set label-split = false for strategy {self.strategy!r}")
        if self.bn_statistics != "batch" and self.norm != "batchnorm":
            raise SettingsError(f"bn-statistics = {self.bn_statistics!r}: re-estimating statistics is for "
                                f"norm = 'batchnorm' (batch statistics while training), not {self.norm!r}")
        if self.dp != "none" and self.bn_statistics != "batch":
            raise SettingsError(f"bn-statistics = {self.bn_statistics!r}: the server would compute statistics of "
                                "the nodes' training data, which the privacy guarantee does not cover; expected 'batch'")
        if self.dp != "none" and self.client_eval:
            raise SettingsError("client-eval = true: it releases every client's accuracy on its own label mix, "
                                "which the privacy guarantee does not cover; expected false under dp")
        if self.dp != "none" and self.allocation == "speed":
            raise SettingsError("allocation = 'speed': under dp the dealing must not depend on what nodes report; "
                                "expected 'uniform' or 'capacity'")
        if self.dp == "local" and self.norm != "groupnorm":
            raise SettingsError(f"norm = {self.norm!r}: dp='local' (Opacus DP-SGD) needs per-sample gradients, "
                                "which BatchNorm mixes across a batch; set norm='groupnorm'")
        if self.dp == "local" and self.amp is True:
            raise SettingsError("amp = true: dp='local' trains with Opacus' per-sample gradients in fp32 (no bf16 "
                                "autocast there), so amp would change the evaluation only; expected amp = false")
        if self.dp != "none" and self.fraction_evaluate > 0:
            raise SettingsError(f"fraction-evaluate = {self.fraction_evaluate!r}: federated evaluation releases node "
                                "data (losses and accuracies on node-held examples) that no DP noise covers; under "
                                f"dp = {self.dp!r} set fraction-evaluate = 0 (the server evaluates the released model "
                                "on its own test set)")
        if self.dp == "central" and self.norm == "batchnorm-running":
            raise SettingsError("norm = 'batchnorm-running': under dp='central' the running statistics are noised "
                                "like any parameter and a variance can turn negative; set norm='groupnorm' or "
                                "'batchnorm' (batch statistics, no running buffers)")
        if self.dp_sampling == "secret" and (self.capacity_mode == "dynamic" or len(set(self.capacities())) > 1):
            raise SettingsError(f"dp-sampling = 'secret' with capacity-profile = {self.capacity_profile!r} and "
                                f"capacity-mode = {self.capacity_mode!r}: what a node is sent depends on its capacity, "
                                "and each round's bytes, sub-models and evaluated widths are released, so they would "
                                "tell which capacities were sampled and the sample would not stay secret (the "
                                "amplified accountant assumes it does); expected one capacity for every node, or "
                                "dp-sampling = 'public'")

    def check_tracker_installed(self) -> None:
        """SettingsError naming the extra to install when the tracker's library is missing (a
        check of the server's environment, run by the ServerApp before its run directory exists)."""
        try:
            require_tracker(self.tracker)
        except TrackerUnavailable as err:
            raise SettingsError(str(err)) from None

    def model_spec(self, num_classes: int, in_channels: int) -> ModelSpec:
        """The model to build; ``stage-depths`` overrides the preset's depths. A torchvision
        ResNet has torchvision's depths and width (``base-width`` does not apply to it)."""
        if self.model in TORCHVISION_DEPTHS:
            if self.stage_depths:
                raise SettingsError(f"stage-depths = {self.stage_depths!r}: {self.model} has torchvision's "
                                    f"depths {TORCHVISION_DEPTHS[self.model]}; expected ''")
            return ModelSpec(depths=TORCHVISION_DEPTHS[self.model], num_classes=num_classes, in_channels=in_channels,
                             base_width=TORCHVISION_WIDTH, norm=self.norm, arch=self.model, stem=self.stem)
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
                         base_width=self.base_width, norm=self.norm, stem=self.stem, head_norm=self.head_norm)

    def capacities(self) -> tuple[float, ...]:
        """``capacity-profile`` as numbers in [0, 1] in its order (empty: every node says its own, else 1.0):
        the one reading of it (a simulated node's capacity, the dynamic draws)."""
        return parse_profile("capacity-profile", self.capacity_profile, low=0.0, high=1.0)

    def rates(self) -> tuple[float, ...]:
        """``width-rates`` as the widths a node may get, numbers in (0, 1], largest first (``channels``: every
        ``w / base-width``; ``layers``: every width of HeteroFL's per-layer rule; a list: each rate rounded to
        whole first-stage channels)."""
        if self.width_rates == CHANNELS:
            return tuple(width / self.base_width for width in range(self.base_width, 0, -1))
        if self.width_rates == LAYERS:
            return layer_rates(self.base_width)
        listed = parse_rates("width-rates", self.width_rates, f"{CHANNELS!r}, {LAYERS!r} or numbers in (0, 1] "
                             "separated by commas, e.g. '1,0.5,0.25'")
        return tuple(sorted({whole_channels(r, self.base_width) for r in listed}, reverse=True))

    def rolex_overlap(self) -> float | None:
        """``fedrolex-overlap`` as a number in [0, 1], None when unset."""
        if self.fedrolex_overlap == "":
            return None
        try:
            value = float(self.fedrolex_overlap)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:
            raise SettingsError(f"fedrolex-overlap = {self.fedrolex_overlap!r}: expected '' or a number in [0, 1]")
        return value

    def fjord_rates(self) -> tuple[float, ...]:
        """``fjord-levels`` as numbers in (0, 1], largest first."""
        return parse_rates("fjord-levels", self.fjord_levels,
                           "numbers in (0, 1] separated by commas, e.g. '0.2,0.4,0.6,0.8,1.0'")

    def amp_wanted(self) -> bool | str:
        """``amp`` as the nodes and the server's evaluation apply it: ``auto`` is fp32 under
        ``dp='local'``, whose Opacus steps run in fp32 (bf16 would change the evaluation only)."""
        return False if self.dp == "local" and self.amp == "auto" else self.amp

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


def settings_of(settings: RunSettings | None, overrides: Mapping[str, Any]) -> RunSettings:
    """``settings`` (default: :class:`RunSettings`'s defaults) with ``overrides`` (field names)
    applied and validated like any run config (a bad value is a SettingsError naming its key)."""
    base = settings if settings is not None else RunSettings()
    if not overrides:
        return base
    changed = {key.replace("_", "-"): value for key, value in overrides.items()}
    return RunSettings.from_run_config({**base.to_run_config(), **changed})


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


def _explain(error: Mapping[str, Any], run_config: Mapping[str, Any]) -> str:
    """One pydantic error as ``key = value: expected ...``."""
    if not error["loc"] or error["type"] == "value_error" and isinstance(error.get("ctx", {}).get("error"), SettingsError):
        return str(error.get("ctx", {}).get("error") or error["msg"])
    key = str(error["loc"][0])
    value = run_config.get(key, error.get("input"))
    field = RunSettings.model_fields[key.replace("-", "_")]
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "literal_error":
        allowed = (str(a).lower() if isinstance(a, bool) else str(a) for a in typing.get_args(field.annotation))
        expected = f"one of {', '.join(allowed)}"
    elif kind in _TYPE_NAMES:
        expected = f"a value of type {_TYPE_NAMES[kind]}"
    elif kind == "greater_than_equal":
        what = "an integer" if isinstance(ctx["ge"], int) else "a number"
        expected = f"{what} >= {ctx['ge']}"
    elif kind == "greater_than":
        expected = "a positive number" if ctx["gt"] == 0 else f"a number > {ctx['gt']}"
    elif kind == "less_than":
        low = next((getattr(m, a) for m in field.metadata for a in ("gt", "ge") if hasattr(m, a)), None)
        expected = f"a value in ({low}, {ctx['lt']})" if any(hasattr(m, "gt") for m in field.metadata) \
            else f"a value in [{low}, {ctx['lt']})"
    elif kind == "finite_number":
        expected = "a finite number"
    elif kind == "less_than_equal":
        low = next((getattr(m, a) for m in field.metadata for a in ("gt", "ge") if hasattr(m, a)), None)
        expected = f"a value in ({low}, {ctx['le']}]" if any(hasattr(m, "gt") for m in field.metadata) \
            else f"a value in [{low}, {ctx['le']}]"
    else:
        expected = error["msg"]
    if key == "image-size":
        expected = (f"{IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} pixels (the crop imagefolder images are trained "
                    "and evaluated at)")
    if key.replace("-", "_") in ("fraction_train", "fraction_evaluate") and kind in (
            "greater_than", "greater_than_equal", "less_than_equal"):
        expected = "a value in (0, 1]" if key == "fraction-train" else "a value in [0, 1]"
    return f"{key} = {value!r}: expected {expected}"


# -- the documentation's table, generated from the fields -----------------------------------------------

TABLE_START = "<!-- run-config table: generated by python -m resist_fl.run.settings --write docs/run-config.md -->"
TABLE_END = "<!-- end of the run-config table -->"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def run_config_table() -> str:
    """The markdown table of every run-config key: default and description, from the fields."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in RunSettings.model_fields.items():
        lines.append(f"| `{kebab(name)}` | `{_toml(field.default)}` | {field.description} |")
    return "\n".join(lines)


def parse_rates(key: str, text: str, expected: str) -> tuple[float, ...]:
    """Width rates written ``'1,0.5,...'`` as distinct numbers in (0, 1], largest first, else
    :class:`SettingsError` naming ``key`` and what was ``expected``."""
    try:
        rates = tuple(sorted({float(r) for r in text.split(",")}, reverse=True))
    except ValueError:
        rates = ()
    if not rates or any(not 0 < r <= 1 for r in rates):
        raise SettingsError(f"{key} = {text!r}: expected {expected}")
    return rates


def with_table(text: str) -> str:
    """``text`` with the table between its markers replaced by :func:`run_config_table`."""
    pattern = re.compile(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no run-config table markers ({TABLE_START!r} ... {TABLE_END!r})")
    return pattern.sub(lambda _m: f"{TABLE_START}\n{run_config_table()}\n{TABLE_END}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the run-config table of a markdown file.")
    parser.add_argument("--write", type=Path, help="rewrite the table in this file")
    parser.add_argument("--check", type=Path, help="exit 1 if this file's table is not the generated one")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(with_table(args.write.read_text()))
    if args.check:
        text = args.check.read_text()
        if with_table(text) != text:
            print(f"{args.check}: the run-config table is stale; run python -m resist_fl.run.settings --write {args.check}")
            return 1
    if not (args.write or args.check):
        print(run_config_table())
    return 0


def resolve_model(settings: RunSettings) -> tuple[ModelSpec, BlockLayout]:
    """Model spec (classes and channels from the dataset) and block layout of a run."""
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


if __name__ == "__main__":
    sys.exit(main())
