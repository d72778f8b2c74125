"""``fedbridge federate simulate``: every site on this machine through Flower's simulation.

The option types here (rounds, strategy, local training settings, ``--set``) are shared with
``fedbridge server start`` so both commands configure a federation the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedbridge.cli.options import (
    AsJson,
    Seed,
    Tracking,
    TrackingOpt,
    TrackingUri,
    TrainLabelMap,
    check_tracking,
    make_console,
    print_json,
    track,
)
from fedbridge.cli.options import Augment as AugmentPreset
from fedbridge.cli.options import Strategy as StrategyName
from fedbridge_shared import defaults
from fedbridge_shared.errors import FedbridgeError
from fedbridge_shared.layout import beside

app = typer.Typer(help="Federated target stage over hospital sites.", no_args_is_help=True)

Init = Annotated[Path, typer.Option(help="Bridge bundle to start from.")]
Out = Annotated[Path, typer.Option("--out", help="Final (best-round) bundle.")]
Rounds = Annotated[int, typer.Option(help="Federated rounds.")]
Strategy = Annotated[StrategyName, typer.Option(help="Federated aggregation.")]
AugmentPerSample = Annotated[int, typer.Option(help="Offline ×N expansion per site.")]
Augment = Annotated[
    AugmentPreset | None,
    typer.Option(help="Augmentation preset (default: the bridge bundle's modality's, else cxr)."),
]
LocalEpochs = Annotated[int, typer.Option(help="Local epochs per round.")]
Lr = Annotated[float, typer.Option(help="Local AdamW learning rate.")]
BatchSize = Annotated[int, typer.Option(help="Local batch size.")]
Val = Annotated[
    Path | None,
    typer.Option("--val-data", help="Server-side validation set for best-round selection."),
]
Test = Annotated[
    Path | None,
    typer.Option("--test-data", help="Test set assessed with the final bundle."),
]
Labels = Annotated[
    str | None,
    typer.Option(
        help="Target labels, comma-separated, when they differ from the bridge bundle's "
        "(rows of shared labels are carried by name, new ones start fresh). "
        "Default: the sites' class folders (simulate) or --val-data/--test-data's (server "
        "start)."
    ),
]
MinSites = Annotated[
    int | None,
    typer.Option(
        "--min-sites",
        help="Quorum: a round goes on without a lost site if this many remain "
        "(default: a majority of the sites expected); fewer stops the run, resumably.",
    ),
]
Settings = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any run-config key, e.g. --set dp.enabled=true."),
]


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``key=value`` strings (dotted kebab-case run-config keys) to a dict."""
    from fedbridge_shared.errors import ConfigError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. dp.enabled=true")
        out[key.strip()] = value.strip()
    return out


def folder_labels(folder: Path | None) -> str | None:
    """The class-folder labels of ``folder``, comma-separated (None without a folder)."""
    if folder is None or not Path(folder).is_dir():
        return None
    from fedbridge_shared.data.samples import scan_folder

    return ",".join(scan_folder(Path(folder)).labels)


def site_labels(
    init: Path, sites: list[Path], label_map: dict[str, tuple[str, ...]] | None = None
) -> str | None:
    """The target labels of a simulation: the bridge bundle's when every site's class folders
    are among them (a site lacking a class still takes part), else the first site's folders
    (the federation retargets the bridge to them; a site with other classes is refused). A
    folder the ``label_map`` declares counts as the labels it maps to."""
    from fedbridge_shared.shortcut import mapped_labels
    from fedbridge_shared.spec import read_bundle_record

    def mapped(labels: str | None) -> str | None:
        if labels is None or not label_map:
            return labels
        return ",".join(mapped_labels(labels.split(","), label_map))

    found = [mapped(folder_labels(s)) for s in sites]
    if not found or found[0] is None:
        return None
    try:
        bridge = read_bundle_record(Path(init))["spec"]["labels"]
    except (FedbridgeError, KeyError, TypeError):
        return found[0]  # the bundle's own error comes with the preflight
    if all(f is not None and set(f.split(",")) <= set(bridge) for f in found):
        return ",".join(bridge)
    return found[0]


def augment_preset(augment: str | None, init: Path) -> str:
    """``--augment`` when given, else the preset of the bridge bundle's modality (an OCT
    bridge gets OCT augmentation), else the default."""
    if augment is not None:
        return str(augment)
    from fedbridge_shared.modality import augment_for
    from fedbridge_shared.spec import read_bundle_record

    modality = str(read_bundle_record(Path(init))["spec"].get("modality", "other"))
    return augment_for(modality, defaults.AUGMENT)


def run_config(
    *,
    init: Path,
    out: Path,
    sites: int,
    min_sites: int | None = None,
    rounds: int,
    strategy: str,
    augment_per_sample: int,
    augment: str | None,
    local_epochs: int,
    lr: float,
    batch_size: int,
    val: Path | None,
    test: Path | None,
    seed: int,
    settings: list[str] | None,
    labels: str | None = None,
) -> dict[str, Any]:
    """The flat run config both commands hand to :class:`FederationConfig`.

    ``sites`` are expected in every round; ``min_sites`` is the quorum of usable updates a round
    needs (default: a majority of ``sites``, :func:`fedbridge_server.config.quorum`, for both
    commands).
    """
    from fedbridge_server.config import merge_overrides
    from fedbridge_server.config import quorum as majority

    quorum = majority(sites) if min_sites is None else min_sites
    options = {
        "init": str(Path(init).resolve()),
        "out": str(Path(out).resolve()),
        "num-server-rounds": rounds,
        "strategy": str(strategy),
        "augment-per-sample": augment_per_sample,
        "augment": augment_preset(augment, init),
        "local-epochs": local_epochs,
        "lr": lr,
        "batch-size": batch_size,
        "seed": seed,
        "val-data": str(Path(val).resolve()) if val else "",
        "test-data": str(Path(test).resolve()) if test else "",
        "labels": labels or "",
        "min-available-sites": sites,
        "min-train-sites": quorum,
        "min-evaluate-sites": quorum,
    }
    return merge_overrides(options, parse_overrides(settings or []), given=given_options())


_OPTION_KEYS = {
    "init": ("init", "--init"), "out_dir": ("out", "--out"),
    "rounds": ("num-server-rounds", "--rounds"), "strategy": ("strategy", "--strategy"),
    "augment_per_sample": ("augment-per-sample", "--augment-per-sample"),
    "augment": ("augment", "--augment"), "local_epochs": ("local-epochs", "--local-epochs"),
    "lr": ("lr", "--lr"), "batch_size": ("batch-size", "--batch-size"),
    "val": ("val-data", "--val-data"), "test": ("test-data", "--test-data"),
    "seed": ("seed", "--seed"), "labels": ("labels", "--labels"),
    "sites": ("min-available-sites", "--sites/--site"),
    "min_sites": ("min-train-sites", "--min-sites"),
}  # fmt: skip


def given_options() -> dict[str, str]:
    """Run-config key → option, for the options typed on this command line."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    given = {}
    for param, (key, option) in _OPTION_KEYS.items():
        source = ctx.get_parameter_source(param)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given[key] = option
    if "min-train-sites" in given:
        given["min-evaluate-sites"] = given["min-train-sites"]
    return given


@app.command()
def simulate(
    init: Init,
    sites: Annotated[list[Path], typer.Option("--site", help="A site's class folders (repeat).")],
    out_dir: Out,
    min_sites: MinSites = None,
    rounds: Rounds = defaults.ROUNDS,
    strategy: Strategy = StrategyName(defaults.STRATEGY),
    augment_per_sample: AugmentPerSample = defaults.TARGET_AUGMENT_PER_SAMPLE,
    augment: Augment = None,
    local_epochs: LocalEpochs = defaults.LOCAL_EPOCHS,
    lr: Lr = defaults.LR,
    batch_size: BatchSize = defaults.BATCH_SIZE,
    val: Val = None,
    test: Test = None,
    settings: Settings = None,
    labels: Labels = None,
    audit_dir: Annotated[
        Path | None,
        typer.Option(help="Write a JSON-lines audit of every message each site sends."),
    ] = None,
    seed: Seed = defaults.SEED,
    as_json: AsJson = False,
    tracking: TrackingOpt = Tracking.none,
    tracking_uri: TrackingUri = None,
    label_map: TrainLabelMap = None,
) -> None:
    """Run the sites on this machine through Flower's simulation runtime.

    ``--label-map`` applies at every site that has a class folder of that name.
    """
    check_tracking(tracking)
    from fedbridge.simulate import simulate as run
    from fedbridge_shared.shortcut import parse_label_map

    declared = parse_label_map(label_map or [])
    flat = run_config(
        init=init, out=out_dir, sites=len(sites), min_sites=min_sites, rounds=rounds,
        strategy=strategy, augment_per_sample=augment_per_sample, augment=augment,
        local_epochs=local_epochs, lr=lr, batch_size=batch_size, val=val, test=test, seed=seed,
        settings=settings,
        labels=labels or site_labels(init, sites, declared),
    )  # fmt: skip
    console = make_console(stderr=as_json)
    summary = run(flat, sites, out=console, audit_dir=audit_dir, label_map=declared)
    track(tracking, tracking_uri, out_dir, console=console, extra_files=federation_files(out_dir))
    if as_json:
        print_json(summary)


def federation_files(out: Path) -> tuple[Path, ...]:
    """The round store's ``state.json`` (every round's numbers), tracked beside the bundle."""
    return (beside(out, "rounds") / "state.json",)
