"""Model factory over timm and the ``--init`` rules: none | imagenet | FILE | BUNDLE."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data.config import resolve_model_data_config
from timm.models import register_model
from timm.models.efficientnet import _gen_mobilenet_v1
from torch import nn

from fedbridge_shared import defaults
from fedbridge_shared.data.images import file_sha256
from fedbridge_shared.errors import BundleError, ConfigError
from fedbridge_shared.files import read_json_object
from fedbridge_shared.layout import WEIGHTS_FILE
from fedbridge_shared.spec import Bundle, ModelSpec, check_timm_kwargs, is_bundle, load_bundle

WEIGHTS_DIR_ENV = "FEDBRIDGE_WEIGHTS_DIR"


_MOBILENETV1_025_CFG = {
    "input_size": (3, 128, 128),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "classifier": "classifier",
    "num_classes": 1000,
}


@register_model
def mobilenetv1_025(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNet-V1 x0.25 (0.47 M params), the tiny ImageNet model in ../shared/weights."""
    # timm's create_model passes pretrained_cfg=None explicitly (setdefault would keep it), and
    # a None config makes timm warn "No pretrained configuration specified" on every build
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or _MOBILENETV1_025_CFG
    # timm leaves its generator functions unannotated
    model: nn.Module = _gen_mobilenet_v1(  # type: ignore[no-untyped-call]
        "mobilenetv1_025", 0.25, pretrained=pretrained, **kwargs
    )
    return model


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised timm model for ``spec`` (weights are loaded separately)."""
    return _create(
        spec.arch,
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
        timm_kwargs=spec.timm_kwargs,
    )


def _create(
    arch: str, *, num_classes: int, in_chans: int = 3, timm_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    kwargs = timm_kwargs or {}
    check_timm_kwargs(kwargs)  # before timm sees them: no file paths, no `pretrained`
    try:
        return timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"unknown timm model {arch!r}: {e}") from e
    except (TypeError, ValueError, AssertionError) as e:  # kwargs the architecture refuses
        raise ConfigError(f"timm cannot build {arch!r} with {kwargs}: {e}") from e


def model_from_bundle(bundle: Bundle) -> nn.Module:
    """The bundle's model with its weights, every tensor's name and shape checked first."""
    model = build_model(bundle.spec)
    expected = model.state_dict()
    where = bundle.path / WEIGHTS_FILE
    missing = [k for k in expected if k not in bundle.state_dict]
    extra = [k for k in bundle.state_dict if k not in expected]
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise BundleError(
            f"{where}: tensors do not fit {bundle.spec.arch} ({what}; {len(missing)} missing, "
            f"{len(extra)} unexpected)"
        )
    for name, tensor in bundle.state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise BundleError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)}, {bundle.spec.arch} with "
                f"{bundle.spec.num_classes} labels expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(bundle.state_dict)
    return model


def init_model(
    init: str,
    labels: Sequence[str],
    arch: str | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Create a model for ``labels`` starting from ``init``; returns the model and its spec.

    ``init`` is ``none`` (random), ``imagenet`` (a local weights file for ``arch`` if one is
    found in ``$FEDBRIDGE_WEIGHTS_DIR``, else timm's hub), a ``.safetensors`` file (with an
    optional sidecar ``.json`` giving arch, timm kwargs, input size, mean/std) or a bundle folder.
    A new classification head is created whenever the class labels differ from the source's.
    """
    labels = tuple(labels)
    if len(labels) < 2:
        raise ConfigError(f"need at least 2 classes, got {list(labels)}")
    if init == "none":
        return _init_none(labels, arch or defaults.ARCH, image_size)
    if init == "imagenet":
        arch = arch or defaults.ARCH
        local = find_local_imagenet_weights(arch)
        if local is not None:
            return _init_from_file(local, labels, arch, image_size)
        return _init_from_hub(labels, arch, image_size)
    path = Path(init)
    if is_bundle(path):
        return _init_from_bundle(path, labels, arch, image_size)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ConfigError(f"{path}: --init weights file not found")
        return _init_from_file(path, labels, arch, image_size)
    if path.exists():
        raise ConfigError(f"{path}: --init must be a bundle folder or a .safetensors file")
    raise ConfigError(
        f"--init {init!r}: not 'none', 'imagenet', an existing bundle or a .safetensors file"
    )


def find_local_imagenet_weights(arch: str) -> Path | None:
    """A ``.safetensors`` with a sidecar JSON naming ``arch`` in ``$FEDBRIDGE_WEIGHTS_DIR``."""
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return None
    for sidecar in sorted(Path(folder).glob("*.json")):
        weights = sidecar.with_suffix(".safetensors")
        if weights.is_file() and _read_sidecar(weights).get("arch") == arch:
            return weights
    return None


def _data_config(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Input size and mean/std of ``model``, as timm resolves its pretrained config."""
    cfg = resolve_model_data_config(model)  # type: ignore[no-untyped-call]  # timm is untyped
    return int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"])


def _init_none(
    labels: tuple[str, ...], arch: str, image_size: int | None
) -> tuple[nn.Module, ModelSpec]:
    model = _create(arch, num_classes=len(labels))
    size, mean, std = _data_config(model)
    spec = ModelSpec(
        arch=arch,
        labels=labels,
        image_size=image_size or size,
        mean=mean,
        std=std,
        init={"kind": "none"},
    )
    return model, spec


def _init_from_hub(
    labels: tuple[str, ...], arch: str, image_size: int | None
) -> tuple[nn.Module, ModelSpec]:
    try:
        model = timm.create_model(arch, pretrained=True, num_classes=len(labels))
        zero_head(model)
    except Exception as e:  # network and hub errors come in many types
        raise ConfigError(
            f"could not get ImageNet weights for {arch!r} from the Hugging Face hub ({e}); "
            f"when offline, set {WEIGHTS_DIR_ENV} to a folder of weights or pass "
            "--init PATH.safetensors"
        ) from e
    size, mean, std = _data_config(model)
    cfg: dict[str, Any] = model.pretrained_cfg  # type: ignore[assignment]  # timm sets it
    hub_id = cfg.get("hf_hub_id") or arch
    spec = ModelSpec(
        arch=arch,
        labels=labels,
        image_size=image_size or size,
        mean=mean,
        std=std,
        init={"kind": "imagenet", "source": f"timm hub: {hub_id}"},
    )
    return model, spec


def _read_sidecar(weights: Path) -> dict[str, Any]:
    return read_json_object(weights.with_suffix(".json"), what="sidecar JSON") or {}


def _init_from_file(
    weights: Path, labels: tuple[str, ...], arch: str | None, image_size: int | None
) -> tuple[nn.Module, ModelSpec]:
    side = _read_sidecar(weights)
    if arch and side.get("arch") and side["arch"] != arch:
        raise ConfigError(
            f"{weights}: holds {side['arch']!r} weights (sidecar JSON) but --model is {arch!r}"
        )
    arch = arch or side.get("arch")
    if not arch:
        raise ConfigError(f"{weights}: no sidecar JSON naming the arch; pass --model")
    timm_kwargs = dict(side.get("timm_kwargs", {}))
    model = _create(arch, num_classes=len(labels), timm_kwargs=timm_kwargs)
    size, mean, std = _data_config(model)
    if "input_size" in side:
        size = int(side["input_size"][-1])
    spec = ModelSpec(
        arch=arch,
        labels=labels,
        image_size=image_size or size,
        mean=tuple(side.get("mean", mean)),
        std=tuple(side.get("std", std)),
        timm_kwargs=timm_kwargs,
        init={
            "kind": "imagenet" if side else "file",
            "source": str(weights.resolve()),
            "sha256": file_sha256(weights),
            "description": side.get("source", ""),
        },
    )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{weights}: unreadable safetensors file ({e})") from e
    load_backbone(model, state, source=str(weights))
    return model, spec


def _init_from_bundle(
    path: Path, labels: tuple[str, ...], arch: str | None, image_size: int | None
) -> tuple[nn.Module, ModelSpec]:
    bundle = load_bundle(path)
    if arch and arch != bundle.spec.arch:
        raise ConfigError(f"{path}: bundle holds {bundle.spec.arch!r} but --model is {arch!r}")
    return retarget(bundle, labels, image_size=image_size)


def retarget(
    bundle: Bundle, labels: Sequence[str], *, image_size: int | None = None
) -> tuple[nn.Module, ModelSpec]:
    """The bundle's model for ``labels``: backbone kept, classifier rows carried by label name.

    A bridge set rarely has the target's labels (Kermany CXR: NORMAL, BACTERIAL_PNEUMONIA,
    VIRAL_PNEUMONIA; the target adds COVID19). Rows of labels present in both are copied, in the
    target's order; only the new labels' rows start fresh (zero, as every new head here). The
    mapping is recorded in ``spec.init["label_map"]`` (target label → source label or null).
    """
    src = bundle.spec
    labels = tuple(labels)
    label_map = {label: (label if label in src.labels else None) for label in labels}
    head = "kept" if src.labels == labels else "mapped" if any(label_map.values()) else "new"
    spec = ModelSpec(
        arch=src.arch,
        labels=labels,
        image_size=image_size or src.image_size,
        in_chans=src.in_chans,
        mean=src.mean,
        std=src.std,
        timm_kwargs=src.timm_kwargs,
        intensity=src.intensity,  # a CLAHE bridge makes a CLAHE target
        modality=src.modality,
        init={
            "kind": "bundle",
            "source": str(bundle.path.resolve()),
            "sha256": bundle.sha256,
            "source_labels": list(src.labels),
            "head": head,
            "label_map": label_map,
            "previous_init": src.init,
        },
    )
    model = build_model(spec)
    prefixes = _head_prefixes(model)
    backbone = {k: v for k, v in bundle.state_dict.items() if not k.startswith(prefixes)}
    own_head = {k for k in model.state_dict() if k.startswith(prefixes)}
    load_backbone(
        model, {**backbone, **{k: model.state_dict()[k] for k in own_head}}, str(bundle.path)
    )
    zero_head(model)
    _carry_rows(model, bundle.state_dict, src.labels, label_map)
    return model, spec


def _carry_rows(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source_labels: Sequence[str],
    label_map: dict[str, str | None],
) -> None:
    """Copy the source classifier's rows into ``model``'s head by label (weight and bias)."""
    head = model.get_classifier()  # type: ignore[operator]  # timm method
    prefix = _head_prefixes(model)[0]
    with torch.no_grad():
        for name, param in head.named_parameters():
            source = state.get(prefix + name)
            if source is None or source.shape[0] != len(source_labels):
                raise ConfigError(f"bundle head tensor {prefix + name} does not match its labels")
            for row, src_label in enumerate(label_map.values()):
                if src_label is not None:
                    param[row] = source[list(source_labels).index(src_label)]


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load ``state`` into ``model``, skipping only the head when its class count differs.

    Returns the names of the skipped (re-initialised) tensors. Any other missing or unexpected
    tensor means the weights belong to another architecture: refused with an error.
    """
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    head = _head_prefixes(model)
    if any(not k.startswith(head) for k in skipped):
        bad = [k for k in skipped if not k.startswith(head)][:3]
        raise ConfigError(f"{source}: tensor shapes do not fit {type(model).__name__}: {bad}")
    result = model.load_state_dict(
        {k: v for k, v in state.items() if k not in skipped}, strict=False
    )
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{source}: weights do not fit this architecture "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    if skipped:
        zero_head(model)
    return skipped


def zero_head(model: nn.Module) -> None:
    """Zero a new classification head so fine-tuning starts from uniform predictions.

    timm's default head init scales with 1/sqrt(num_classes); with pretrained features that
    gives initial logits in the tens and a loss several times ln(K).
    """
    head = model.get_classifier()  # type: ignore[operator]  # timm method
    for p in head.parameters():
        nn.init.zeros_(p)


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the classification head (from timm's pretrained cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "classifier"
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)
