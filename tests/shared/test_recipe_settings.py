"""The recipe options reach a stage (TrainConfig) and a site (LocalSettings), off by default."""

import pytest

from fedbridge_shared import defaults
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.protocol import LocalSettings
from fedbridge_shared.training import TrainConfig


def test_components_are_off_by_default():
    config, local = TrainConfig(), LocalSettings()
    assert (config.ema_decay, config.balanced, config.intensity) == (0.0, False, None)
    assert (local.ema_decay, local.balanced) == (0.0, False)
    assert defaults.TTA is False and defaults.INTENSITY == "none"
    assert defaults.STRATEGY == "fedavg" and defaults.SERVER_MOMENTUM == 0.0


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
