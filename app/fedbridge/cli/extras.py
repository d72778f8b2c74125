"""Which extra to install when a command meets a missing library: one line, not a traceback."""

from __future__ import annotations

_EXTRA_OF_MODULE = {
    **dict.fromkeys(
        (
            "torch",
            "torchvision",
            "timm",
            "safetensors",
            "albumentations",
            "sklearn",
            "scipy",
            "matplotlib",
        ),
        "train",
    ),  # fmt: skip
    "captum": "explain",
    "ray": "simulation",
    "onnx": "edge",
    "onnxruntime": "edge",
    "pynetdicom": "edge",
    "highdicom": "edge",
    "onnxscript": "export",
    "mlflow": "tracking",
}
_EXTRA_OF_COMMAND = {
    ("federate",): "simulation",
    ("demo",): "simulation",
    ("server",): "server",
    ("site",): "client",
    ("export",): "export",
    ("explain",): "explain",
}


def missing_extra_message(module: str | None, argv: list[str]) -> str | None:
    """``fedbridge COMMAND`` needs extra X: the line to print, or None if not one of ours."""
    top = (module or "").split(".")[0]
    words = [a for a in argv if not a.startswith("-")]
    command = " ".join(words[:2]) or "this command"
    by_command = next((e for k, e in _EXTRA_OF_COMMAND.items() if tuple(words[:1]) == k), None)
    if top in ("flwr", "cryptography", "tomli_w"):
        extra = by_command or "server"
    elif top in _EXTRA_OF_MODULE:
        extra = _EXTRA_OF_MODULE[top]
        # the role's extra also brings the library, and everything else the command needs
        if (
            by_command
            and extra != "tracking"
            and (extra in ("train", "edge") or by_command == "simulation")
        ):
            extra = by_command
    else:
        return None
    return (
        f"`fedbridge {command}` needs the '{extra}' extra (missing module {top}): "
        f"pip install 'fedbridge[{extra}]'"
    )
