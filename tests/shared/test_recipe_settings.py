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
