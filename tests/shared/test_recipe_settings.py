"""The recipe options reach a stage (TrainConfig) and a site (LocalSettings), off by default."""

import pytest

from fedbridge_shared import defaults
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.protocol import LocalSettings
from fedbridge_shared.training import TrainConfig


def test_the_default_recipe_is_the_validated_one():
    """BENCHMARKS.md §0: on validation patients the target stage's EMA (0.99) was chosen; the
    other components stay off; bridges and a site's short rounds run no EMA."""
    config, local = TrainConfig(), LocalSettings()
    assert (config.ema_decay, config.balanced, config.intensity) == (0.99, False, None)
    assert config.label_smoothing == 0.0
    assert (local.ema_decay, local.balanced) == (0.0, False)
    assert defaults.BRIDGE_EMA_DECAY == 0.0 == defaults.SITE_EMA_DECAY
    assert defaults.TTA is False and defaults.INTENSITY == "none"
    assert defaults.STRATEGY == "fedavg" and defaults.SERVER_MOMENTUM == 0.0


@pytest.mark.parametrize(
    "decay, steps, horizon, applied",
    [(0.99, 99, 100, False), (0.99, 100, 100, True), (0.9, 10, 10, True), (0.0, 500, 0, False)],
)
def test_the_ema_runs_only_when_a_stage_outlasts_its_horizon(decay, steps, horizon, applied):
    from fedbridge_shared.training import ema_plan

    plan = ema_plan(decay, steps=steps)
    assert (plan["horizon"], plan["applied"]) == (horizon, applied)


def test_site_settings_round_trip_through_the_round_config():
    local = LocalSettings(ema_decay=0.99, balanced=True)
    config = local.to_config()
    assert config["ema-decay"] == 0.99 and config["balanced"] is True
    assert LocalSettings.from_config(config) == local


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"ema_decay": 1.0}, "--ema-decay 1.0"),
        ({"ema_decay": -0.5}, "--ema-decay -0.5"),
        ({"intensity": "gamma"}, "--intensity 'gamma'"),
    ],
)
def test_bad_stage_settings_are_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**kwargs)


def test_bad_site_settings_are_refused():
    with pytest.raises(ConfigError, match="'ema-decay'"):
        LocalSettings(ema_decay=1.0)
    with pytest.raises(ConfigError, match="'balanced' must be true or false"):
        LocalSettings.from_config({"balanced": "false"})


def test_a_stage_and_a_site_bound_each_shared_setting_the_same():
    """One declaration per setting: TrainConfig and LocalSettings cannot disagree on a bound."""
    shared = set(TrainConfig.model_fields) & set(LocalSettings.model_fields)
    assert {"batch_size", "augment_per_sample", "lr", "weight_decay", "seed"} <= shared
    for name in shared:
        assert TrainConfig.bound(name) == LocalSettings.bound(name), name
    with pytest.raises(ConfigError, match=r"^--batch-size 5000: must be in \[1, 4096\]$"):
        TrainConfig(batch_size=5000)
    with pytest.raises(ConfigError, match=r"'batch-size' \(5000\): must be in \[1, 4096\]$"):
        LocalSettings(batch_size=5000)
    with pytest.raises(ConfigError, match=r"'augment-per-sample' \(101\): must be in \[0, 100\]"):
        LocalSettings(augment_per_sample=101)


def test_preset_is_the_former_name_of_augment():
    """Bundles written before the rename carry ``preset`` in their config: still read."""
    old = TrainConfig(**{**TrainConfig().model_dump(exclude={"augment"}), "preset": "oct"})
    assert old.augment == "oct" == old.preset
    assert "augment" in old.model_dump() and "preset" not in old.model_dump()
    with pytest.raises(ConfigError, match="--augment 'bogus': must be one of cxr, oct, none"):
        TrainConfig(preset="bogus")
