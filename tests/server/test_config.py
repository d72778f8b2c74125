"""Run config: dotted kebab-case keys ↔ frozen dataclasses, with errors naming the key."""

import pytest

from fedbridge_server.config import FederationConfig
from fedbridge_shared.errors import ConfigError


def test_flat_keys_round_trip_through_nested_dataclasses():
    cfg = FederationConfig.from_flat(
        {
            "num-server-rounds": "5",
            "strategy": "fedadam",
            "dp.enabled": "true",
            "dp.noise-multiplier": 0.5,
            "fedadam.eta": "0.01",
            "init": "b",
        }
    )
    assert cfg.num_server_rounds == 5 and cfg.dp.enabled and cfg.dp.noise_multiplier == 0.5
    assert cfg.fedadam.eta == 0.01
    assert FederationConfig.from_flat(cfg.to_flat()) == cfg


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"rounds": 3}, "unknown key 'rounds'"),
        ({"dp.epsilon": 1}, "unknown key 'dp.epsilon'"),
        ({"num-server-rounds": "three"}, "'num-server-rounds' must be int"),
        ({"dp.enabled": "maybe"}, "'dp.enabled' must be bool"),
        ({"dp": 1}, "'dp' must be a table"),
        ({"strategy": "fedsgd"}, "'strategy'"),
        ({"fraction-train": 0}, "'fraction-train'"),
    ],
)
def test_bad_keys_and_values_are_named(flat, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        FederationConfig.from_flat(flat)


def test_sites_get_the_proximal_term_only_with_fedprox():
    assert FederationConfig(strategy="fedavg").local_settings().proximal_mu == 0.0
    assert FederationConfig(strategy="fedprox", proximal_mu=0.1).local_settings().proximal_mu == 0.1


def test_pyproject_run_config_is_valid():
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    flat = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert FederationConfig.from_flat(flat).num_server_rounds >= 1
