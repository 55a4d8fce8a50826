"""The run config: pyproject defaults, the settings class and the run-config reference agree."""

import re

import pytest

from resist_fl.run.settings import RunSettings, SettingsError, main, with_table
from tests.conftest import ROOT, default_run_config


def test_pyproject_defaults_are_the_settings_defaults():
    assert RunSettings.from_run_config(default_run_config()) == RunSettings()
    assert RunSettings().to_run_config() == default_run_config()


def test_the_run_config_reference_documents_every_key():
    """The run-config reference table is the one generated from the settings' fields (so it cannot disagree)."""
    readme = (ROOT / "docs" / "run-config.md").read_text()
    assert with_table(readme) == readme, "stale: python -m resist_fl.run.settings --write docs/run-config.md"
    table = readme.split("# Run config", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z][a-z0-9-]+)`", table, re.M))
    assert set(default_run_config()) == documented, set(default_run_config()) ^ documented
    assert main(["--check", str(ROOT / "docs" / "run-config.md")]) == 0


# Every settings error, in one place: the key, the bad value and what is allowed, before round 1.
# (The app-level tests that a bad key stops a run before round 1 stay with the apps.)
SETTINGS_ERRORS = [
    ({"strategy": "fedprox"}, "strategy = 'fedprox': expected one of resist, fedavg"),
    ({"model": "resnet9"}, "model = 'resnet9': expected one of preact_resnet18"),
    ({"batch-size": "big"}, "batch-size = 'big': expected a value of type int"),
    ({"amp": 1}, "amp = 1: expected one of auto, true, false"),
    ({"lr": True}, "lr = True: expected a value of type float"),
    ({"seed": 2.5}, "seed = 2.5: expected a value of type int"),
    ({"num-rounds": 3}, "unknown run-config key\\(s\\): num-rounds = 3; known keys: strategy"),
    ({"num-server-rounds": 0}, "num-server-rounds = 0: expected an integer >= 1"),
    ({"shards-per-partition": 0}, "shards-per-partition = 0: expected an integer >= 1"),
    ({"warmup-rounds": -1}, "warmup-rounds = -1: expected an integer >= 0"),
    ({"local-steps": 0}, "local-steps = 0: expected an integer >= 1 \\(or set local-epochs > 0\\)"),
    ({"lr": -1.0}, "lr = -1.0: expected a positive number"),
    ({"server-lr": 0.0}, "server-lr = 0.0: expected a positive number"),
    ({"clip-grad-norm": -1.0}, "clip-grad-norm = -1.0: expected a number >= 0"),
    ({"fraction-train": 0.0}, "fraction-train = 0.0: expected a value in \\(0, 1\\]"),
    ({"fraction-train": 1.5}, "fraction-train = 1.5: expected a value in \\(0, 1\\]"),
    ({"strategy": "fedavg", "fraction-evaluate": 1.5}, "fraction-evaluate = 1.5: expected a value in \\[0, 1\\]"),
    ({"fraction-evaluate": 0.5}, "fraction-evaluate = 0.5: ResIST evaluates centrally only"),
    ({"image-size": 8}, "image-size = 8: expected 16 to 1024 pixels"),
    ({"dataset": "imagefolder"}, "data-path = '': dataset 'imagefolder' needs the absolute path"),
    ({"dataset": "npz"}, "data-path = '': dataset 'npz' needs the absolute path"),
    ({"partitioner": "pathological"}, "partitioner = 'pathological': expected one of iid, dirichlet"),
    ({"tracker": "wandb"}, "tracker = 'wandb': expected one of none, tensorboard, mlflow"),
    ({"allocation": "greedy"}, "allocation = 'greedy': expected one of uniform, capacity, speed"),
    ({"capacity-profile": "1.0,1.5"}, "capacity-profile = '1.0,1.5': expected numbers in \\(0, 1\\]"),
    ({"slowdown-profile": "0.5"}, "slowdown-profile = '0.5': expected numbers >= 1"),
    ({"eval-depths": "0,50"}, "eval-depths = '0,50': expected percentages in \\(0, 100\\]"),
    ({"partitioned-stages": "3,7"}, "partitioned-stages = '3,7': expected stage numbers 1-4"),
    ({"stage-depths": "1,1,x,1"}, "stage-depths = '1,1,x,1': expected four positive integers"),
    ({"model": "torchvision_resnet50", "stage-depths": "1,1,4,1"},
     "stage-depths = '1,1,4,1': torchvision_resnet50 has torchvision's"),
    ({"min-train-nodes": 3}, "min-train-nodes = 3: expected at most min-available-nodes \\(2\\)"),
    ({"min-train-replies": 3}, "min-train-replies = 3: expected at most min-train-nodes \\(2\\)"),
    ({"resume": True}, "resume = True: needs run-name"),
    ({"server-lr": -0.5}, "server-lr = -0.5: expected a positive number"),
    ({"capacity-profile": "a,b"}, "capacity-profile = 'a,b': expected numbers in \\(0, 1\\]"),
    ({"partitioner": "shard", "shards-per-partition": 0}, "shards-per-partition = 0: expected an integer >= 1"),
    ({"lr": float("inf")}, "lr = inf: expected a finite number"),
    ({"weight-decay": float("inf")}, "weight-decay = inf: expected a finite number"),
    ({"seed": 2**60}, f"seed = {2**60}: expected a value in \\[0, 4294967296\\)"),
    ({"dp-delta": 1.0}, "dp-delta = 1.0: expected a value in \\(0, 1.0\\)"),
    ({"strategy": "depthfl", "feddyn-alpha": "0.1"}, "feddyn-alpha = '0.1': expected a value of type float"),
    # a key the run's other settings leave unread (as a key the strategy does not read: test_registry)
    ({"dp-clip": 2.0}, "dp-clip = 2.0: read only with dp='central' or 'local', and this run has dp = 'none'"),
    ({"dp": "central", "weighting": "uniform", "dp-clip-lr": 0.5},
     "dp-clip-lr = 0.5: read only with dp='central' with dp-clip-quantile > 0"),
    ({"dirichlet-alpha": 0.3}, "dirichlet-alpha = 0.3: read only with partitioner='dirichlet', and this run has "
     "partitioner = 'iid'"),
    ({"shards-per-partition": 3}, "shards-per-partition = 3: read only with partitioner='shard'"),
    ({"data-path": "/data/x.npz"}, "data-path = '/data/x.npz': read only with dataset 'npz'"),
    ({"image-size": 64}, "image-size = 64: read only with dataset='imagefolder'"),
    ({"tracking-uri": "http://x"}, "tracking-uri = 'http://x': read only with tracker='mlflow'"),
    ({"local-epochs": 1, "local-steps": 3}, "local-steps = 3: read only with local-epochs = 0"),
    ({"model": "torchvision_resnet18", "base-width": 32}, "base-width = 32: read only with a preact_resnet"),
    ({"model": "torchvision_resnet18", "base-width": 16, "head-norm": True}, "head-norm = True: read only with"),
    ({"model": "torchvision_resnet18", "head-norm": True}, "head-norm = True: read only with a preact_resnet"),
    ({"privacy-strict": True}, "privacy-strict = True: read only with privacy-min-holders > 1"),
    ({"dp": "local", "norm": "groupnorm", "clip-grad-norm": 0.5},
     "clip-grad-norm = 0.5: read only with dp other than 'local'"),
]


@pytest.mark.parametrize("config, message", SETTINGS_ERRORS, ids=[next(iter(c)) + f"-{i}" for i, (c, _) in
                                                                 enumerate(SETTINGS_ERRORS)])
def test_a_bad_setting_is_a_settings_error_naming_key_value_and_what_is_allowed(config, message):
    with pytest.raises(SettingsError, match=f"^{message}"):
        RunSettings.from_run_config(config)


def test_settings_are_declared_once_with_a_description_each():
    for name, field in RunSettings.model_fields.items():
        assert field.description and field.alias == name.replace("_", "-"), name
    assert RunSettings.model_config["extra"] == "forbid" and RunSettings.model_config["frozen"]
    assert RunSettings.from_run_config({"lr": 1, "num-server-rounds": 3.0}).lr == 1.0  # TOML numbers


def test_values_that_are_accepted():
    assert RunSettings.from_run_config({"partitioner": "shard", "shards-per-partition": 3}).shards_per_partition == 3
    assert RunSettings.from_run_config({"model": "preact_resnet18", "stem": "imagenet"}).model_spec(10, 3).stem == \
        "imagenet"
    spec = RunSettings.from_run_config({"model": "torchvision_resnet50", "stem": "imagenet"}).model_spec(10, 3)
    assert (spec.arch, spec.stem, spec.base_width) == ("torchvision_resnet50", "imagenet", 64)


@pytest.mark.parametrize("strategy", ["heterofl", "fedrolex", "fjord"])
def test_a_setting_the_strategy_does_not_read_is_refused(strategy):
    with pytest.raises(SettingsError, match=f"server-lr = 0.5: strategy '{strategy}' does not use it"):
        RunSettings.from_run_config({**default_run_config(), "strategy": strategy, "server-lr": 0.5})
    RunSettings.from_run_config({**default_run_config(), "strategy": strategy})  # its default is fine
