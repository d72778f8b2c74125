"""Run settings are checked in one place before any process starts: one `error:` line, nothing
written, for an out-of-bounds value or a `--set` key that contradicts a typed option."""

import pytest
from cli import assert_one_line_error, fedbridge


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--set", "batch-size=1e400"], ["'batch-size' must be int (finite)"]),
        (["--set", "fedadam.beta-1=5", "--strategy", "fedadam"], ["'fedadam.beta-1'"]),
        (["--set", "fedadam.eta=-1", "--strategy", "fedadam"], ["'fedadam.eta'"]),
        (
            ["--rounds", "1", "--set", "num-server-rounds=2"],
            ["--set num-server-rounds=2", "--rounds"],
        ),
        (["--set", "out=elsewhere"], ["--set out=elsewhere disagrees with --out"]),
        (["--set", "min-available-sites=5"], ["min-available-sites=5", "--sites/--site"]),
    ],
)
def test_simulate_refuses_bad_settings_in_one_line(fed, tmp_path, extra, needles):
    root, split = fed
    out = tmp_path / "work" / "out"
    result = fedbridge(
        "federate", "simulate", "--init", root / "bridge", "--site", split / "site-1",
        "--site", split / "site-2", "--out", out, *extra,
    )  # fmt: skip
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "work").exists()


def test_server_start_refuses_a_set_key_that_contradicts_an_option(fed, tmp_path):
    root, split = fed
    out = tmp_path / "work" / "out"
    result = fedbridge(
        "server", "start", "--init", root / "bridge", "--out", out, "--sites", "2",
        "--insecure", "--set", "min-available-sites=5",
    )  # fmt: skip
    assert_one_line_error(result, "--set min-available-sites=5 disagrees with --sites/--site 2")
    assert not (tmp_path / "work").exists()
