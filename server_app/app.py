"""The ServerApp: run config -> model -> strategy (any of the project's) -> results on disk."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from logging import ERROR, INFO, WARNING
from typing import Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from resist_fl.core.client_accuracy import client_accuracies, fairness_summary
from resist_fl.core.decomposition import BlockLayout, scale_key
from resist_fl.core.model import ModelSpec, build_model
from resist_fl.core.residual_nets import set_residual_scales
from resist_fl.data import DataError, EvalBatches, load_partition, load_test_set, normalization
from resist_fl.data.partitioning import partition_label_counts
from resist_fl.core.model_cost import CostModel
from resist_fl.core.width_slicing import sliced_spec
from resist_fl.flower.method_factory import ModelParts, build
from resist_fl.flower.width_sliced import prefix_state
from resist_fl.flower.round_recorder import RoundRecorder
from resist_fl.run.outputs import CONFIG_FILE, read_json, run_directory, write_json
from resist_fl.run.settings import RunSettings, resolve_model
from resist_fl.run.tracking import open_tracker
from resist_fl.node.batchnorm_statistics import with_training_statistics
from resist_fl.node.precision import explain, precision, uses_bf16
from resist_fl.node.training import (ClassEvaluation, Outputs, evaluate, evaluate_by_class, evaluate_outputs,
                                     resolve_device)

app = ServerApp()


def model_config(spec: ModelSpec) -> ConfigRecord:
    """What every train and evaluate message carries besides what the strategy stamps: the data's
    shape, which only the server's data set knows (so a node with its own data set needs no server
    file). Hyper-parameters are not repeated here: every node reads them from its run config."""
    return ConfigRecord({"num-classes": spec.num_classes, "in-channels": spec.in_channels})


class ClientTiers(Protocol):
    """What a strategy says of the sub-models its nodes would run (:meth:`SubModelStrategy.client_tiers`)."""

    def client_tiers(self) -> dict[int, Hashable]: ...

    def tier_model(self, tier: Hashable, state: dict[str, torch.Tensor]) -> torch.nn.Module: ...


class CentralEvaluation:
    """The project's evaluation (a :class:`RoundRecorder` ``evaluation``): loss and accuracy of
    the global model on the central test set, plus ``accuracy-depth-<pct>`` for every
    ``eval-depths`` percentage and ``accuracy-width-<pct>`` for every width below 1 in ``widths``
    (the recorder's: the shares of the global model nodes have held so far, from the round reports),
    each the global model's first ``r x C`` channels, as HeteroFL evaluates its tiers. With
    ``client_labels`` (``client-eval``), rounds on the whole test set also give the per-client
    figures ``client-accuracy-{mean,worst10,min,std}`` (:mod:`resist_fl.core.client_accuracy`). ``outputs``
    (the strategy's :meth:`~resist_fl.flower.round_skeleton.SubModelStrategy.evaluation_outputs`) names parts of
    the global model also scored alone, in the same pass, as ``accuracy-<name>`` (DepthFL: each exit,
    ``accuracy-exit-<k>``).
    With ``bn-statistics='training-data'`` the global model is evaluated with BatchNorm statistics
    re-estimated over the whole training set first (HeteroFL's static BatchNorm,
    :mod:`resist_fl.node.batchnorm_statistics`; the tiers keep batch statistics)."""

    def __init__(self, settings: RunSettings, spec: ModelSpec, layout: BlockLayout, test_loader: EvalBatches,
                 subset_loader: EvalBatches | None = None,
                 client_labels: ClientLabels | None = None, tiers: ClientTiers | None = None,
                 outputs: Callable[[torch.nn.Module], Outputs] | None = None) -> None:
        self.settings, self.spec, self.layout, self.test_loader = settings, spec, layout, test_loader
        self.subset_loader = subset_loader  # eval-subset: intermediate rounds (None: the whole test set)
        self.client_labels, self.tiers, self.outputs = client_labels, tiers, outputs
        self.sliced: dict[float, torch.nn.Module] = {}  # width-tier evaluation models, by rate
        self.device = resolve_device(settings.device)
        self.bf16 = uses_bf16(settings.amp_wanted(), self.device)  # amp, decided for the server's own device
        self.model = build_model(spec)  # built once, loaded with the global state at each evaluation
        self.truncated: dict[int, torch.nn.Module] = {}  # any-depth evaluation models, by percent
        self.training_set: EvalBatches | None = None  # bn-statistics='training-data': the training set's batches

    def __call__(self, run_round: int, state: dict[str, torch.Tensor], widths: frozenset[float]) -> dict[str, float]:
        final = run_round >= self.settings.num_server_rounds or self.subset_loader is None
        loader = self.test_loader if final else self.subset_loader
        model = self.global_model(state)
        results = evaluate_outputs(model, loader, self.device, self.bf16, self.outputs(model) if self.outputs else None)
        result = results.pop("")
        metrics = {"loss": result.loss, "accuracy": result.accuracy, "eval-images": len(loader.data)}
        metrics.update({f"accuracy-{name}": part.accuracy for name, part in results.items()})
        counts = self.client_labels() if self.client_labels is not None and loader is self.test_loader else None
        if counts is not None:
            summary = fairness_summary(client_accuracies(counts, result.correct, result.count))
            metrics.update({f"client-accuracy-{k}": v for k, v in summary.items()})
            metrics.update(self.tier_figures(state, counts, result))
        for percent in self.settings.depth_percents():
            metrics[f"accuracy-depth-{percent}"] = self.evaluate_truncated(state, percent)
        for rate in sorted(r for r in widths if r < 1):
            metrics[f"accuracy-width-{round(100 * rate, 2):g}"] = self.evaluate_width(state, rate)
        return metrics

    def tier_figures(self, state: dict[str, torch.Tensor], counts: np.ndarray, full: ClassEvaluation) -> dict:
        """``client-tier-accuracy-*``: each client on its label mix with the sub-model its node would run
        (the strategy's tier for the node's capacity: a width method's prefix of that width, as HeteroFL
        evaluates its tiers; DepthFL's first stages and their exits; the depth prefix's first blocks),
        over the clients whose node said its capacity."""
        tiers = {p: t for p, t in (self.tiers.client_tiers() if self.tiers else {}).items() if p < len(counts)}
        if not tiers:
            return {}
        by_tier = {tier: evaluate_by_class(self.tiers.tier_model(tier, state).to(self.device), self.test_loader,
                                           self.device, self.bf16) for tier in set(tiers.values())}
        accuracy = [client_accuracies(counts[p:p + 1], by_tier[t].correct, by_tier[t].count)[0]
                    for p, t in sorted(tiers.items())]
        return {f"client-tier-accuracy-{k}": v for k, v in fairness_summary(np.array(accuracy)).items()}

    def global_model(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The model evaluated: the global state, with statistics re-estimated on the training data
        under ``bn-statistics='training-data'``."""
        if self.settings.bn_statistics == "training-data":
            s = self.settings
            if self.training_set is None:  # loaded and batched once, re-used at every evaluation
                whole = load_partition(s.dataset, 0, 1, partitioner="iid", seed=s.seed, data_path=s.data_path,
                                       image_size=s.image_size, validation_size=s.validation_size)
                self.training_set = EvalBatches(whole, s.batch_size, device=self.device, normalization=normalization(
                    s.dataset, s.data_path, s.image_size, s.validation_size))
            return with_training_statistics(self.spec, state, self.training_set, self.device)
        self.model.load_state_dict(state)
        return self.model

    def evaluate_width(self, state: dict[str, torch.Tensor], rate: float) -> float:
        """Accuracy of the global model's width-``rate`` prefix sub-model (no scaler at evaluation)."""
        return self.width_by_class(state, rate).accuracy

    def width_by_class(self, state: dict[str, torch.Tensor], rate: float) -> ClassEvaluation:
        """Per-label results of the global model's width-``rate`` prefix sub-model on the test set."""
        if rate not in self.sliced:
            self.sliced[rate] = build_model(sliced_spec(self.spec, rate))
        model = self.sliced[rate]
        model.load_state_dict(prefix_state(self.spec, state, rate))
        return evaluate_by_class(model, self.test_loader, self.device, self.bf16)

    def evaluate_truncated(self, state: dict[str, torch.Tensor], percent: int) -> float:
        """Accuracy of the global model keeping only the first ``percent`` % of the partitionable
        blocks (at least one): what a device that keeps part of the model gets. Its blocks are
        scaled as a sub-network of the trained depth would be: ``min(1, s * P / k)`` for k kept of
        P blocks and full-model scale s (so 100 % is the full model exactly)."""
        blocks = self.layout.partitionable
        kept = blocks[:max(1, round(len(blocks) * percent / 100))]
        if percent not in self.truncated:
            self.truncated[percent] = self.layout.build_subnetwork(self.spec, kept)
        model = self.truncated[percent]
        full_scale = float(state[scale_key(blocks[0])])
        model.load_state_dict({k: state[k] for k in self.layout.subnetwork_keys(kept)})
        set_residual_scales(model, {b: min(1.0, full_scale * len(blocks) / len(kept)) for b in kept})
        return evaluate(model, self.test_loader, self.device, self.bf16)[1]


class ClientLabels:
    """``client-eval``: the label counts of every partition of the run's split, once the nodes
    have said how many partitions there are (None before, or when they train on data of their own).
    The server splits the data set exactly as the nodes do (same partitioner, alpha, seed)."""

    def __init__(self, settings: RunSettings, num_classes: int, num_partitions: Callable[[], int | None]) -> None:
        self.settings, self.num_classes, self.num_partitions = settings, num_classes, num_partitions
        self.counts: np.ndarray | None = None

    def __call__(self) -> np.ndarray | None:
        parts = self.num_partitions()
        if parts is None:
            return None
        if self.counts is None or len(self.counts) != parts:
            s = self.settings
            self.counts = partition_label_counts(
                s.dataset, parts, self.num_classes, partitioner=s.partitioner, alpha=s.dirichlet_alpha, seed=s.seed,
                data_path=s.data_path, image_size=s.image_size, shards_per_partition=s.shards_per_partition,
                validation_size=s.validation_size)
            log(INFO, "resist-fl: client-eval over the %d partitions of the split", parts)
        return self.counts


def prepare_data(settings: RunSettings) -> tuple[ModelSpec, BlockLayout, EvalBatches, dict, EvalBatches | None]:
    """Model spec and layout (classes and channels from the data), the central test loader, what the
    data pipeline chose (logged, and recorded in ``run_config.json``), and the loader of the
    ``eval-subset`` images (None without one).

    A data set that cannot be loaded stops the run here, before round 1 and before a run
    directory exists, with the reason and what to do as the last lines the app logs.
    """
    try:
        spec, layout = resolve_model(settings)
        test = load_test_set(settings.dataset, settings.data_path, settings.image_size, settings.validation_size)
        stats = normalization(settings.dataset, settings.data_path, settings.image_size, settings.validation_size)
    except DataError as err:
        log(ERROR, "resist-fl: the data set cannot be used:\n    %s", err)
        raise DataError(str(err)) from None
    data = {"dataset": settings.dataset, "augment": settings.augmentation(),
            "image-shape": list(test.images.shape[1:]), "test-size": len(test),
            "normalization": {"mean": list(stats.mean), "std": list(stats.std)}}
    log(INFO, "resist-fl: data %s, images %s, augment=%s (%s), normalisation mean %s std %s",
        settings.dataset, "x".join(map(str, data["image-shape"])), data["augment"], settings.augment,
        [round(m, 4) for m in stats.mean], [round(s, 4) for s in stats.std])
    if settings.validation_size:
        data["validation-size"] = settings.validation_size
        log(INFO, "resist-fl: every evaluation uses the %d training images held out as the validation set "
            "(validation-size); the nodes train on the rest, and nothing is evaluated on the test set", len(test))
    loader = EvalBatches(test, settings.eval_batch_size, normalization=stats,
                              device=resolve_device(settings.device))
    subset = None
    if 0 < settings.eval_subset < len(test):  # a fixed random subset, the same every round
        chosen = np.sort(np.random.default_rng(settings.seed).choice(len(test), settings.eval_subset, replace=False))
        subset = EvalBatches(test.subset(chosen), settings.eval_batch_size, normalization=stats,
                             device=resolve_device(settings.device))
        data["eval-subset"] = settings.eval_subset
    return spec, layout, loader, data, subset


def nodes_precision(amp: bool | str, local_dp: bool) -> str:
    """What the nodes train in, as the server can say it before they answer (each node decides
    ``auto`` for its own device, logs it and reports it: ``precision`` in ``nodes.jsonl``)."""
    return explain(amp, None, local_dp)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the strategy the run config names; write everything under the run directory."""
    settings = RunSettings.from_run_config(context.run_config)
    settings.check_tracker_installed()  # a missing extra stops the run before its directory is made
    spec, layout, test_loader, data, subset_loader = prepare_data(settings)
    costs = CostModel(spec, layout, tuple(data["image-shape"][1:]))
    built = build(settings, ModelParts(spec, layout, costs))  # the method table's factory for `strategy`
    run_dir = run_directory(settings.output_dir, settings.run_name, settings.strategy)
    started = run_dir / CONFIG_FILE  # resuming: the model the run started with, not the nodes connected now
    built = built.for_federation(grid, read_json(started)["model_spec"] if settings.resume and started.exists()
                                 else None)  # a model shaped by the nodes' capacities (fedavg-small) waits for them
    strategy, spec, layout = built.strategy, built.model.spec, built.model.layout
    central = resolve_device(settings.device)
    evaluated_in = precision(uses_bf16(settings.amp_wanted(), central))
    local_dp = settings.dp == "local"
    log(INFO, "resist-fl: nodes train in %s (device=%s); central evaluation in %s on %s",
        nodes_precision(settings.amp, local_dp), settings.device, explain(settings.amp, central, local_dp), central)
    if settings.resume and started.exists() and \
            (before := read_json(started).get("central-evaluation", {}).get("precision", evaluated_in)) != evaluated_in:
        log(WARNING, "resist-fl: resuming with the central evaluation in %s where the run started in %s (amp='auto' "
            "on another device): the result will not be bit-identical to an uninterrupted run; set amp=true or "
            "amp=false to fix the precision", evaluated_in, before)
    log(INFO, "resist-fl: full model %.3g GFLOP per training sample, %d parameters; the smallest ResIST "
        "sub-network costs %.0f %% of it", costs.full.flops / 1e9, costs.full.params, 100 * costs.floor_fraction())
    recorder = RoundRecorder(strategy, layout, run_dir, run_config=settings.to_run_config(),
                             num_rounds=settings.num_server_rounds,
                             evaluation=CentralEvaluation(
                                 settings, spec, layout, test_loader, subset_loader,
                                 ClientLabels(settings, spec.num_classes, strategy.sampler.num_partitions)
                                 if settings.client_eval else None,
                                 strategy if settings.client_eval else None, strategy.evaluation_outputs),
                             eval_every=settings.eval_every, inference_scaling=settings.inference_scaling,
                             resume=settings.resume,
                             target_accuracy=settings.target_accuracy, dp=settings.dp,
                             secret_sample=settings.dp == "central" and settings.dp_sampling == "secret")
    torch.manual_seed(settings.seed)
    initial = build_model(spec).state_dict()  # the seed's initial model (resuming: only its shapes are used)
    recorder.check_resumable(initial)  # before anything in the run directory is rewritten
    recorder.tracker = open_tracker(settings.tracker, run_dir, settings.to_run_config(), settings.tracking_uri)
    log(INFO, "resist-fl: writing results to %s", run_dir)
    write_json(run_dir / CONFIG_FILE, {"run_config": settings.to_run_config(), "model_spec": spec.to_dict(),
                                       "data": data, "central-evaluation": {
                                           "device": str(central),
                                           "precision": evaluated_in}})

    recorder.start(grid, initial,  # resuming: the checkpoint's arrays
                   timeout=settings.round_timeout, train_config=model_config(spec),
                   evaluate_config=model_config(spec))
    recorder.finish(spec.to_dict())
