"""Where `edge predict` writes: names unique by construction, one run's folder replaced whole.

Each image's outputs are named after its path relative to the folder it was found in (a file
input: its own name), without the suffix, with ``%`` and ``/`` percent-encoded:
``scans/a.png`` → ``a.json``, ``scans/sub/a.png`` → ``sub%2Fa.json``, ``scans/a-2.png`` →
``a-2.json``. Two images can share a name only when their paths differ by the suffix alone
(``a.png``, ``a.jpg``) or two inputs hold the same relative path; that is refused before any
work, naming both. A run's folder lists the files it wrote in ``.fedbridge-predict``; ``--force``
replaces exactly those (a person's own files in the folder stay), and the whole run is written
into a temp folder first, so a failure or a full disk leaves the previous folder as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedbridge_edge.errors import EdgeError

MARKER = ".fedbridge-predict"


def encode(relative: Path) -> str:
    """A relative path as one file name: ``%`` → ``%25``, ``/`` → ``%2F`` (reversible)."""
    return "%2F".join(part.replace("%", "%25") for part in relative.parts)


def output_names(images: list[Path], inputs: Iterable[Path]) -> list[str]:
    """One unique base name per image (see the module docstring); EdgeError on a collision."""
    roots = [Path(p) for p in inputs]
    names: list[str] = []
    owner: dict[str, Path] = {}
    for image in images:
        relative = _relative(image, roots)
        name = encode(relative.with_suffix("")) or "image"
        if name in owner:
            raise EdgeError(
                f"{owner[name]} and {image} would both write {name}.json; "
                "give them in separate runs (or under one folder)"
            )
        owner[name] = image
        names.append(name)
    return names


def _relative(image: Path, roots: list[Path]) -> Path:
    for root in roots:
        if root.is_dir():
            try:
                return image.resolve().relative_to(root.resolve())
            except ValueError:
                continue
        elif root.resolve() == image.resolve():
            return Path(image.name)
    return Path(image.name)


def check_out(out: Path, inputs: Iterable[Path], *, force: bool) -> None:
    """Refuse an ``--out`` inside (or equal to) an input folder, a file, or an earlier run's
    folder without ``--force``, and a folder fedbridge did not write (with or without it)."""
    resolved = out.resolve()
    for item in inputs:
        folder = Path(item).resolve()
        if folder.is_dir() and (resolved == folder or resolved.is_relative_to(folder)):
            raise EdgeError(f"--out {out}: inside the input folder {item}; write elsewhere")
    if out.exists() and not out.is_dir():
        raise EdgeError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise EdgeError(
                f"--out {out}: a folder fedbridge did not write (no {MARKER}); "
                "give a new or empty folder"
            )
        if not force:
            raise EdgeError(
                f"--out {out}: holds an earlier run's predictions; add --force to replace them"
            )


def written_before(out: Path) -> set[str]:
    """The names an earlier run listed in its marker (empty when there was none)."""
    marker = out / MARKER
    if not marker.is_file():
        return set()
    return {line for line in marker.read_text(encoding="utf-8").splitlines() if line}


def write_marker(folder: Path, names: Iterable[str]) -> None:
    (folder / MARKER).write_text("".join(f"{n}\n" for n in sorted(names)), encoding="utf-8")


def remove_stale(out: Path, before: set[str], now: set[str]) -> None:
    """Delete what the earlier run wrote and this one did not (nothing else)."""
    for name in sorted(before - now - {MARKER}):
        path = out / name
        if "/" not in name and path.is_file() and not path.is_symlink():
            path.unlink()
