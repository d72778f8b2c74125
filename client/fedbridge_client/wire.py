"""Frames between a site's ClientApp process and its long-lived worker, over a Unix socket.

A frame is two lengths, a JSON header and the model weights as safetensors (never pickles).
Both ends import only numpy and safetensors: the per-message ClientApp process stays light.
"""

from __future__ import annotations

import json
import socket
import struct

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

_LENGTHS = struct.Struct("!QQ")
MAX_HEADER = 16 << 20  # bytes
MAX_BODY = 8 << 30  # bytes: far above any model fedbridge trains at a site


class WireError(RuntimeError):
    """A frame that is cut short, too large or not what the protocol says."""


def send_frame(
    sock: socket.socket, header: dict, arrays: dict[str, np.ndarray] | None = None
) -> None:
    """Send ``header`` (JSON) and ``arrays`` (safetensors) as one frame."""
    head = json.dumps(header).encode()
    # np.ascontiguousarray would make a 0-d array 1-d: copy only what is not C-ordered
    body = (
        save_arrays({k: np.array(v, order="C", copy=None) for k, v in arrays.items()})
        if arrays
        else b""
    )
    sock.sendall(_LENGTHS.pack(len(head), len(body)) + head + body)


def recv_frame(sock: socket.socket) -> tuple[dict, dict[str, np.ndarray]]:
    """One frame: its header and arrays (empty when the frame carries none)."""
    n_head, n_body = _LENGTHS.unpack(_recv_exact(sock, _LENGTHS.size))
    if n_head > MAX_HEADER or n_body > MAX_BODY:
        raise WireError(f"frame of {n_head} + {n_body} bytes is over the limit")
    try:
        header = json.loads(_recv_exact(sock, n_head))
    except ValueError as e:
        raise WireError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("frame header is not a JSON object")
    body = _recv_exact(sock, n_body) if n_body else b""
    return header, (load_arrays(body) if body else {})


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WireError(f"connection closed with {left} of {n} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
