"""Convert a MedMNIST-format ``.npz`` (``<split>_images`` / ``<split>_labels``) to class folders."""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedbridge_shared.data.images import MIN_SIDE
from fedbridge_shared.data.split import refuse_non_empty
from fedbridge_shared.errors import ConfigError, DataError
from fedbridge_shared.files import atomic_dir

MANIFEST_COLUMNS = ("path", "label", "patient_id", "split")


MAX_CLASSES = 1000
MAX_ARRAY_BYTES = 8 * 2**30


def import_npz(
    npz_path: Path,
    out: Path,
    labels: Sequence[str] | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
) -> dict[str, int]:
    """Write ``out/<label>/<split>_<index:05d>.png`` and MANIFEST.csv; return images per split.

    MedMNIST has no patient ids, so each image is its own patient (``npz:<split>_<index>``).
    Class names come from ``labels`` (in label-index order) or default to ``class_<k>``.
    """
    npz_path = Path(npz_path)
    arrays = _load(npz_path, splits)
    n_classes = max(int(y.max()) + 1 if y.size else 0 for _, y in arrays.values())
    if n_classes > MAX_CLASSES:
        raise DataError(
            f"{npz_path}: a label index of {n_classes - 1} means {n_classes} classes; "
            f"fedbridge takes at most {MAX_CLASSES}"
        )
    if sum(len(x) for x, _ in arrays.values()) == 0:
        raise DataError(f"{npz_path}: every split is empty; no images to import")
    names = _class_names(labels, n_classes)
    for split, (_, y) in arrays.items():
        if y.size and (y.min() < 0 or y.max() >= len(names)):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise DataError(
                f"{npz_path}: {split}_labels has label index {bad}, outside 0..{len(names) - 1} "
                f"({len(names)} class names)"
            )

    counts: dict[str, int] = {}
    refuse_non_empty(Path(out))
    with atomic_dir(Path(out)) as tmp:
        for name in names:
            (tmp / name).mkdir()
        rows = []
        for split, (x, y) in arrays.items():
            for i, (image, target) in enumerate(zip(x, y, strict=True)):
                relative = f"{names[target]}/{split}_{i:05d}.png"
                Image.fromarray(image).save(tmp / relative)
                rows.append((relative, names[target], f"npz:{split}_{i}", split))
            counts[split] = len(x)
        with (tmp / "MANIFEST.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(rows)
    return counts


def _load(npz_path: Path, splits: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load and validate ``(images, labels)`` per split; labels come back as 1-D int64."""
    if not splits:
        raise ConfigError("no splits given: name at least one, e.g. train")
    try:
        archive = np.load(npz_path, allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(f"{npz_path}: file does not exist") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{npz_path}: not a readable .npz archive ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{npz_path}: holds a single array, not a .npz archive of named arrays")
    with archive:
        wanted = [f"{s}_{kind}" for s in splits for kind in ("images", "labels")]
        missing = [key for key in wanted if key not in archive.files]
        if missing:
            raise DataError(
                f"{npz_path}: missing array(s) {', '.join(missing)} "
                f"(has: {', '.join(sorted(archive.files)) or 'none'})"
            )
        loaded = {}
        for s in splits:
            pair = []
            for key in (f"{s}_images", f"{s}_labels"):
                _check_declared_size(npz_path, archive, key)
                try:
                    value = archive[key]
                except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError) as e:
                    raise DataError(f"{npz_path}: corrupt array {key} in archive ({e})") from e
                if not isinstance(value, np.ndarray):
                    raise DataError(f"{npz_path}: {key} is not a .npy array")
                pair.append(value)
            loaded[s] = (pair[0], pair[1])
    return {s: _validate(npz_path, s, x, y) for s, (x, y) in loaded.items()}


def _check_declared_size(npz_path: Path, archive: Any, key: str) -> None:  # an open NpzFile
    """Read a member's .npy header and refuse an array too large to load, before loading it."""
    try:
        with archive.zip.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(fh)
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile):
        return  # np.load below says what is wrong with it
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size > MAX_ARRAY_BYTES:
        raise DataError(
            f"{npz_path}: {key} declares shape {tuple(shape)} ({size / 2**30:.3g} GiB); "
            f"more than the {MAX_ARRAY_BYTES / 2**30:g} GiB fedbridge imports"
        )


def _validate(
    npz_path: Path, split: str, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Check one split's shapes and dtypes (uint8 images, one integer label per image)."""
    if x.dtype != np.uint8:
        raise DataError(f"{npz_path}: {split}_images must be uint8, got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise DataError(
            f"{npz_path}: {split}_images has shape {x.shape}; expected (N, H, W) or (N, H, W, 3)"
        )
    if len(x) and min(x.shape[1:3]) < MIN_SIDE:
        raise DataError(
            f"{npz_path}: {split}_images are {x.shape[1]}x{x.shape[2]} pixels; every reader "
            f"needs at least {MIN_SIDE}x{MIN_SIDE}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{npz_path}: {split}_labels must be integers, got {y.dtype}")
    if y.ndim == 2 and y.shape[1] != 1:
        raise DataError(
            f"{npz_path}: {split}_labels has shape {y.shape}: multi-label data is not supported"
        )
    shape = y.shape
    y = y.reshape(-1) if y.ndim == 2 else y
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"{npz_path}: {split}_labels has shape {shape} but {split}_images holds {len(x)} "
            "images; expected one label per image"
        )
    return x, y.astype(np.int64)


def _class_names(labels: Sequence[str] | None, n_classes: int) -> list[str]:
    """Validate user class names (usable as folder names) or make ``class_<k>`` names."""
    if labels is None:
        return [f"class_{k}" for k in range(n_classes)]
    names = [str(name).strip() for name in labels]
    for name in names:
        if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\"):
            raise ConfigError(f"class name {name!r} cannot be used as a folder name")
    if len(set(names)) != len(names):
        raise ConfigError(f"class names must be unique, got {names}")
    return names
