"""Options renamed so that one name means one thing in every command; the old spellings keep
working for one release (0.2) as hidden aliases, with a note on stderr.

- ``export onnx --batch`` → ``--batch-size``: images per batch, as in ``train``/``explain``;
- ``--val`` → ``--val-data`` (``export onnx``, ``federate simulate``, ``server start``): a
  folder, like the run-config key ``val-data`` (``--val-fraction`` is a share);
- ``--test`` → ``--test-data`` (``federate simulate``, ``server start``): run-config key
  ``test-data``;
- ``server certs --host`` → ``--cert-host``: ``--host`` is the address a command binds
  (``server start``, ``edge serve``, ``edge listen``).

The aliases are rewritten on the command line before typer parses it, so ``--help`` shows only
the new names and the commands' signatures stay one option per name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_FEDERATION = {"--val": "--val-data", "--test": "--test-data"}
RENAMED: dict[tuple[str, ...], dict[str, str]] = {
    ("export", "onnx"): {"--batch": "--batch-size", "--val": "--val-data"},
    ("federate", "simulate"): _FEDERATION,
    ("server", "start"): _FEDERATION,
    ("server", "certs"): {"--host": "--cert-host"},
}


def rewrite(argv: Sequence[str], *, note: Callable[[str], None]) -> list[str]:
    """``argv`` (without the program name) with old option names replaced by the new ones;
    ``note`` is told once per old name used. Only options after the command's words count
    (``fedbridge export onnx B --val D``); everything after ``--`` is left alone."""
    args = list(argv)
    words = [i for i, a in enumerate(args) if not a.startswith("-")]
    for path, renames in RENAMED.items():
        if [args[i] for i in words[: len(path)]] != list(path):
            continue
        start = words[len(path) - 1] + 1
        told: set[str] = set()
        for i in range(start, len(args)):
            if args[i] == "--":
                break
            name, eq, value = args[i].partition("=")
            new = renames.get(name)
            if new is None:
                continue
            args[i] = new + eq + value
            if name not in told:
                told.add(name)
                note(f"{name} is now {new} (the old name goes in a later release)")
        break
    return args
