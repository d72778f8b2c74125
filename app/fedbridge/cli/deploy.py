"""``fedbridge server …`` (the coordinator) and ``fedbridge site …`` (a hospital site admin).

A real federation on Flower's Deployment Engine, TLS and SuperNode authentication on unless
``--insecure`` is passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedbridge.cli.federate import (
    Augment,
    AugmentPerSample,
    BatchSize,
    Init,
    Labels,
    LocalEpochs,
    Lr,
    MinSites,
    Out,
    Rounds,
    Settings,
    Strategy,
    Test,
    Val,
    federation_files,
    folder_labels,
    run_config,
)
from fedbridge.cli.options import (
    Seed,
    Tracking,
    TrackingOpt,
    TrackingUri,
    TrainLabelMap,
    check_tracking,
    make_console,
    track,
)
from fedbridge.cli.options import Strategy as StrategyName
from fedbridge_shared import defaults
from fedbridge_shared import rounds as R
from fedbridge_shared.layout import beside

server_app = typer.Typer(help="The coordinator: certificates and the federation run.")
site_app = typer.Typer(help="A hospital site: its key pair and joining a federation.")

Insecure = Annotated[
    bool, typer.Option("--insecure", help="No TLS and no authentication (testing only).")
]
Force = Annotated[bool, typer.Option("--force", help="Replace existing files.")]


@server_app.command("certs")
def certs(
    out: Annotated[Path, typer.Option(help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--cert-host", help="Name or IP the sites use to reach the SuperLink (repeat)."
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the server certificate in days.")] = 365,
    ca_days: Annotated[int, typer.Option(help="Validity of a new CA in days.")] = 3650,
    renew: Annotated[
        bool,
        typer.Option(
            "--renew",
            help="Keep the CA in OUT (the sites' ca.crt stays valid) and issue a new server "
            "certificate.",
        ),
    ] = False,
    force: Force = False,
) -> None:
    """Create a private CA and the SuperLink's TLS certificate, for this machine's host name,
    the --cert-host names and localhost; prints the CA's SHA-256 fingerprint."""
    from fedbridge_shared import pki

    files = pki.make_certs(
        out, pki.default_hosts(hosts or []), days=days, force=force, ca_days=ca_days, renew=renew
    )
    console = make_console()
    written = (pki.SERVER_CERT, pki.SERVER_KEY) if renew else tuple(files)
    console.print(f"wrote {', '.join(written)} to {out}")
    console.print(f"server certificate for: {', '.join(pki.default_hosts(hosts or []))}")
    # one unbroken line, however narrow the terminal: it is read aloud, byte by byte
    console.print(f"CA SHA-256 fingerprint: {pki.fingerprint(files[pki.CA_CERT])}", soft_wrap=True)
    console.print(
        f"give {files[pki.CA_CERT]} to every site and read them the fingerprint over a second "
        "channel (phone); keep ca.key and server.key private"
    )


@server_app.command("start")
def start(
    init: Init,
    out_dir: Out,
    certs_dir: Annotated[
        Path | None,
        typer.Option("--certs", help="Folder from `fedbridge server certs`."),
    ] = None,
    site_keys: Annotated[
        list[Path] | None,
        typer.Option("--site-key", help="A site's public key (NAME.pub) to admit (repeat)."),
    ] = None,
    sites: Annotated[
        int, typer.Option("--sites", help="Sites expected: every round waits for them.")
    ] = 2,
    min_sites: MinSites = None,
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="SuperLink port (sites connect here).")] = 9092,
    state: Annotated[
        Path | None,
        typer.Option(help="Flower's database, logs and app folder (default: OUT-superlink)."),
    ] = None,
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
    insecure: Insecure = False,
    seed: Seed = defaults.SEED,
    tracking: TrackingOpt = Tracking.none,
    tracking_uri: TrackingUri = None,
) -> None:
    """Start the SuperLink, admit the sites' keys and run the federation to the end.

    Restarting with the same --out resumes after the last completed round.
    """
    check_tracking(tracking)
    from fedbridge_server.config import FederationConfig
    from fedbridge_server.deploy import Coordinator
    from fedbridge_server.deploy import start as run

    flat = run_config(
        init=init, out=out_dir, sites=sites, rounds=rounds, strategy=strategy,
        min_sites=min_sites,
        augment_per_sample=augment_per_sample, augment=augment, local_epochs=local_epochs,
        lr=lr, batch_size=batch_size, val=val, test=test, seed=seed, settings=settings,
        labels=labels or folder_labels(val or test),
    )  # fmt: skip
    coord = Coordinator(
        config=FederationConfig.from_flat(flat),
        state=state or beside(out_dir, "superlink"),
        host=host,
        port=port,
        certs=certs_dir,
        insecure=insecure,
        site_keys=site_keys or [],
    )
    record = run(coord, make_console())
    best = (record.get("metrics") or {}).get("best_round") or {}
    console = make_console()
    console.print(f"federated bundle: {out_dir} (best round {best.get(R.ROUND, '?')})")
    track(tracking, tracking_uri, out_dir, console=console, extra_files=federation_files(out_dir))


@server_app.command("status")
def status(
    out_dir: Annotated[
        Path, typer.Option("--out", help="The final bundle's folder given to `server start`.")
    ],
    state: Annotated[
        Path | None,
        typer.Option(help="The coordinator's state folder (default: OUT-superlink)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document on stdout, for tools.")
    ] = False,
) -> None:
    """Sites, runs, rounds (current and completed), per-round and per-site metrics, the best
    round and dropped sites: from the SuperLink (while it runs) and the round store."""
    import json

    from fedbridge_server.status import collect, render

    doc = collect(out_dir, state)
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        render(doc, make_console())


@site_app.command("keys")
def keys(
    name: Annotated[str, typer.Option(help="This site's name, e.g. st-marys.")],
    out: Annotated[Path, typer.Option(help="Folder for NAME.key and NAME.pub.")] = Path("keys"),
    force: Force = False,
) -> None:
    """Create this site's key pair; send NAME.pub to the coordinator, keep NAME.key here."""
    from fedbridge_shared import pki

    private, public = pki.make_site_keys(out, name, force=force)
    make_console().print(f"private key {private} (keep it here); public key {public} (send it)")


@site_app.command("join")
def join(
    superlink: Annotated[str, typer.Option(help="The coordinator's HOST:PORT.")],
    data: Annotated[Path, typer.Option(help="This site's class folders (never leave the site).")],
    name: Annotated[str, typer.Option(help="This site's name (shown in the server log).")],
    ca: Annotated[
        Path | None,
        typer.Option(help="The coordinator's ca.crt."),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(help="This site's private key from `fedbridge site keys`."),
    ] = None,
    runtime_port: Annotated[
        int, typer.Option(help="Local port for Flower's app runtime (one per site on a host).")
    ] = 9094,
    log: Annotated[
        Path | None,
        typer.Option(help="SuperNode log file (default: ./NAME-supernode.log)."),
    ] = None,
    audit_dir: Annotated[
        Path | None,
        typer.Option(help="Write a JSON-lines audit of every message this site sends."),
    ] = None,
    admit_timeout: Annotated[
        float, typer.Option(help="Seconds to keep retrying until the SuperLink admits this site.")
    ] = 600.0,
    insecure: Insecure = False,
    label_map: TrainLabelMap = None,
) -> None:
    """Connect this site's data to a federation and train when the coordinator asks.

    Runs until Ctrl-C or SIGTERM: the site serves every run the coordinator starts. The
    ``--label-map`` stays at the site: the coordinator sees only counts of the model's labels.
    """
    from fedbridge_client.join import SiteNode
    from fedbridge_client.join import join as run
    from fedbridge_shared.shortcut import parse_label_map

    node = SiteNode(
        superlink=superlink, data=data, name=name, ca=ca, key=key, insecure=insecure,
        runtime_port=runtime_port, audit_dir=audit_dir,
        label_map=parse_label_map(label_map or []),
    )  # fmt: skip
    run(node, log or Path(f"{name}-supernode.log"), make_console(), admit_timeout=admit_timeout)
