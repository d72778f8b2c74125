"""Run config: dotted kebab-case keys ↔ frozen dataclasses, with errors naming the key."""

import pytest

from fedbridge_server.config import FederationConfig
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.protocol import LocalSettings, RecordDP, RoundTask


def test_flat_keys_round_trip_through_nested_dataclasses():
    cfg = FederationConfig.from_flat(
        {
            "num-server-rounds": "5",
            "strategy": "fedprox",
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
    fedprox = FederationConfig.from_flat({"strategy": "fedprox", "proximal-mu": 0.1})
    assert fedprox.local_settings().proximal_mu == 0.1


def test_local_settings_are_composed_and_their_keys_stay_flat():
    cfg = FederationConfig.from_flat({"lr": "0.01", "local-epochs": 2, "dp.enabled": True})
    assert cfg.local.lr == 0.01 and cfg.local.local_epochs == 2
    flat = cfg.to_flat()
    assert flat["lr"] == 0.01 and "local.lr" not in flat and flat["dp.enabled"] is True
    # every LocalSettings field is a top-level run-config key
    assert {f.replace("_", "-") for f in LocalSettings.model_fields} <= set(flat)


def test_pyproject_run_config_is_valid():
    from pathlib import Path

    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    flat = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    cfg = FederationConfig.from_flat(flat)
    # pyproject.toml repeats the defaults for Flower: they must be the same ones
    default = FederationConfig().to_flat()
    differ = {k: (v, default[k]) for k, v in flat.items() if k in default and default[k] != v}
    assert differ == {"init": ("runs/cxr-bridge", "")}
    assert cfg.num_server_rounds >= 1


def test_flwr_run_paths_must_be_absolute_and_sites_set_the_supernodes(tmp_path):
    from fedbridge_server.server_app import _check_supernodes, _from_flower

    with pytest.raises(ConfigError, match=r"out 'runs/x' is relative.*absolute path"):
        _from_flower({"init": str(tmp_path / "b"), "out": "runs/x"})
    sites = ",".join(str(tmp_path / f"site-{i}") for i in (1, 2, 3))
    with pytest.raises(ConfigError, match="simulation-sites 'site-2' is relative"):
        _from_flower({"init": str(tmp_path), "out": str(tmp_path), "simulation-sites": "/a,site-2"})
    cfg = _from_flower({"init": str(tmp_path), "out": str(tmp_path), "simulation-sites": sites})
    assert cfg.min_available_sites == 3  # every folder's SuperNode is waited for

    class TwoNodes:
        def get_node_ids(self):
            return [1, 2]

    with pytest.raises(ConfigError, match="lists 3 folders but .* has 2 SuperNodes.*= 3"):
        _check_supernodes(TwoNodes(), 3, settle=0.1)
    _check_supernodes(TwoNodes(), 2, settle=0.1)


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"batch-size": "1e400"}, "'batch-size' must be int (finite), got '1e400'"),
        ({"batch-size": 100_000}, "invalid value for 'batch-size'"),
        ({"local-epochs": 0}, "invalid value for 'local-epochs'"),
        ({"fedadam.beta-1": 5}, "invalid value for 'fedadam.beta-1'"),
        ({"fedadam.beta-1": 1}, "invalid value for 'fedadam.beta-1'"),
        ({"fedadam.beta-2": -0.1}, "invalid value for 'fedadam.beta-2'"),
        ({"fedadam.eta": -1}, "invalid value for 'fedadam.eta'"),
        ({"fedadam.eta": 0}, "invalid value for 'fedadam.eta'"),
        ({"fedadam.tau": "nan"}, "invalid value for 'fedadam.tau'"),
        ({"round-timeout": "inf"}, "invalid value for 'round-timeout'"),
        ({"dp.noise-multiplier": 1e300}, "invalid value for 'dp.noise-multiplier'"),
        ({"dp.target-epsilon": 1e-12}, "invalid value for 'dp.target-epsilon'"),
        ({"label-smoothing": 1}, "invalid value for 'label-smoothing'"),
        ({"proximal-mu": "nan"}, "invalid value for 'proximal-mu'"),
        ({"threads": 10**6}, "invalid value for 'threads'"),
    ],
)
def test_every_key_has_bounds_and_huge_numbers_are_one_error(flat, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        FederationConfig.from_flat(flat)


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"dp.level": "patient"}, "'dp.level' ('patient'): site .* or record"),
        ({"dp.max-grad-norm": 0}, "'dp.max-grad-norm' (0.0)"),
        ({"dp.max-grad-norm": 1e9}, "'dp.max-grad-norm'"),
        (
            {"dp.enabled": True, "dp.level": "record", "strategy": "fedprox"},
            "'proximal-mu'.*FedProx's term",
        ),
        ({"dp.enabled": True, "dp.level": "record", "balanced": True}, "'balanced'.*Poisson"),
        ({"dp.enabled": True, "secure-aggregation": True}, "'secure-aggregation'"),
    ],
)
def test_record_level_dp_settings_are_bounded(flat, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        FederationConfig.from_flat(flat)


def test_the_edges_of_the_bounds_are_accepted():
    cfg = FederationConfig.from_flat(
        {"fedadam.beta-1": 0, "fedadam.beta-2": 0.999, "fedadam.eta": 10, "batch-size": 4096}
    )
    assert cfg.fedadam.beta_1 == 0 and cfg.local.batch_size == 4096


def test_a_set_key_that_disagrees_with_a_typed_option_is_refused(tmp_path):
    from fedbridge_server.config import merge_overrides

    flat = {"out": str(tmp_path / "A"), "num-server-rounds": 1, "min-available-sites": 2}
    given = {"out": "--out", "num-server-rounds": "--rounds", "min-available-sites": "--sites"}
    for key, value, option in [
        ("out", str(tmp_path / "B"), "--out"),
        ("num-server-rounds", "2", "--rounds"),
        ("min-available-sites", "5", "--sites"),
    ]:
        with pytest.raises(ConfigError, match=f"--set {key}=.* disagrees with {option}"):
            merge_overrides(flat, {key: value}, given=given)
    # the same value twice, a key no option set, or an option left at its default: fine
    same = {"out": str(tmp_path / "x" / ".." / "A"), "num-server-rounds": "1.0"}
    assert merge_overrides(flat, same, given=given)["num-server-rounds"] == "1.0"
    assert merge_overrides(flat, {"lr": "0.1"}, given=given)["lr"] == "0.1"
    assert merge_overrides(flat, {"out": "B"}, given={})["out"] == "B"
    # keys whose type is a plain choice (no bounds) compare too, and never crash
    choices = {"strategy": "fedprox", "augment": "oct"}
    named = {"strategy": "--strategy", "augment": "--augment"}
    for key, value in (("strategy", "fedavg"), ("augment", "cxr")):
        with pytest.raises(ConfigError, match=f"--set {key}=.* disagrees with --{key}"):
            merge_overrides(choices, {key: value}, given=named)
    assert merge_overrides(choices, {"strategy": "fedprox"}, given=named)["strategy"] == "fedprox"


def test_record_level_dp_goes_to_the_sites_and_works_with_secure_aggregation():
    cfg = FederationConfig.from_flat(
        {"dp.enabled": True, "dp.level": "record", "dp.target-epsilon": 3, "dp.max-grad-norm": 2,
         "secure-aggregation": True, "strategy": "fedavg"}
    )  # fmt: skip
    dp = cfg.record_dp()
    assert dp == RecordDP(max_grad_norm=2.0, noise_multiplier=0.0, target_epsilon=3.0, delta=1e-5)
    task = RoundTask({"arch": "x"}, cfg.local_settings(), 1, 2, dp)
    assert RoundTask.from_config(task.to_config()).dp == dp
    assert RoundTask.from_config(RoundTask({}, cfg.local_settings(), 1, 2).to_config()).dp is None
    assert FederationConfig.from_flat({"dp.enabled": True}).record_dp() is None  # site level
    fedadam = {"dp.enabled": True, "dp.level": "record", "strategy": "fedadam"}
    assert FederationConfig.from_flat(fedadam).dp.record_level  # sites' outputs are already DP


def test_one_quorum_default_for_both_commands(tmp_path):
    """server start and federate simulate: a majority of the expected sites."""
    from fedbridge.cli.federate import run_config
    from fedbridge_server.config import quorum

    assert [quorum(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    flat = run_config(
        init=tmp_path, out=tmp_path / "o", sites=3, rounds=1, strategy="fedavg",
        augment_per_sample=0, augment="cxr", local_epochs=1, lr=1e-3, batch_size=8, val=None,
        test=None, seed=0, settings=None,
    )  # fmt: skip
    assert (flat["min-available-sites"], flat["min-train-sites"], flat["min-evaluate-sites"]) == (
        3, 2, 2,
    )  # fmt: skip
    assert FederationConfig().min_train_sites == quorum(FederationConfig().min_available_sites)
