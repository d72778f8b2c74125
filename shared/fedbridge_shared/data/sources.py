"""Which public data set (source) each image came from, when a manifest says so.

The team manifest (``MANIFEST.csv``) has a ``source_dataset`` column (ieee8023 vs Kermany …);
``fedbridge data split`` writes ``split.csv`` whose ``source`` column is the original file, so
the source of a split image is looked up in the original folder's manifest. Anything else is
unknown (``None``): a report then shows no per-source numbers.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedbridge_shared.data.samples import find_manifest

SOURCE_COLUMN = "source_dataset"
ORIGINAL_COLUMN = "source"  # split.csv: the path of the file the split copied


def _rows(manifest: Path) -> dict[Path, dict[str, str]]:
    """Resolved path → row of a manifest CSV; empty when it cannot be read."""
    base = manifest.resolve().parent
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            return {
                (base / row["path"].strip()).resolve(): row
                for row in csv.DictReader(fh)
                if (row.get("path") or "").strip()
            }
    except (OSError, UnicodeDecodeError, csv.Error, KeyError):
        return {}


def sample_sources(
    samples: Sequence[Any],
    manifest: Path | None,
    rows: Mapping[Path, Mapping[str, str]] | None = None,
) -> list[str | None]:
    """The source data set of each sample (``.path``), in order; ``None`` where unknown.

    ``rows``: the manifest's rows when already read (``FolderIndex.manifest_rows``)."""
    if manifest is None:
        return [None] * len(samples)
    if rows is None:
        rows = _rows(Path(manifest))
    originals: dict[
        Path, Mapping[Path, Mapping[str, str]]
    ] = {}  # original root → its manifest rows
    out: list[str | None] = []
    for sample in samples:
        row = rows.get(Path(getattr(sample, "path", sample)).resolve()) or {}
        source = (row.get(SOURCE_COLUMN) or "").strip()
        original = (row.get(ORIGINAL_COLUMN) or "").strip()
        if not source and original:
            path = Path(original).resolve()
            root = path.parent.parent  # root/<label>/<file>
            if root not in originals:
                found = find_manifest(root)
                originals[root] = _rows(found) if found is not None else {}
            source = (originals[root].get(path, {}).get(SOURCE_COLUMN) or "").strip()
        out.append(source or None)
    return out
