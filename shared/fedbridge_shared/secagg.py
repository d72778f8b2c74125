"""Secure aggregation arithmetic both ends share: quantisation, masks, key agreement.

The protocol (Bonawitz et al. 2017, the masking Flower's SecAgg+ uses) runs on the packed
weight vector: a site sends ``y_i = n_i·q(Δ_i) + PRG(b_i) + Σ_j ±PRG(s_ij)  (mod 2⁶⁴)``, where
``Δ_i`` is its update (new weights − global), ``n_i`` its training images, ``q`` a fixed-point
quantiser, ``b_i`` a private seed and ``s_ij`` a key agreed with site ``j``. Pairwise masks
cancel in the sum; the coordinator removes the private masks from seeds the survivors reveal
through Shamir shares, and rebuilds a dropped site's pairwise masks from shares of its key.
It learns ``Σ n_i·Δ_i`` and ``Σ n_i`` (the sites' counts), never one site's update.

Masks are a ChaCha20 key stream (``cryptography``), uint64 arithmetic wraps mod 2⁶⁴.
Flower-free on purpose: Shamir sharing and the share encryption (``flwr.common.
secure_aggregation``) are used by the two roles, not here.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedbridge_shared.errors import FedbridgeError

LEVELS = 2**32
"""Quantisation levels over ``[-clip, clip]``: n·q fits 2⁶⁴ while Σ n_i < 2³²."""
MAX_WEIGHT_SUM = 2**31


class SecAggError(FedbridgeError):
    """The secure aggregation protocol cannot go on (too few sites, a bad share or message)."""


def quantize(values: np.ndarray, clip: float) -> tuple[np.ndarray, int]:
    """Values clipped to ``[-clip, clip]`` as integers in ``[0, LEVELS)`` (uint64), and how
    many were clipped."""
    x = np.asarray(values, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(x) > clip))
    x = np.clip(x, -clip, clip)
    return np.rint((x + clip) * ((LEVELS - 1) / (2 * clip))).astype(np.uint64), clipped


def dequantize_sum(total: np.ndarray, weight_sum: int, clip: float) -> np.ndarray:
    """``Σ n_i·x_i`` from ``Σ n_i·quantize(x_i)`` (``weight_sum`` = Σ n_i)."""
    step = 2 * clip / (LEVELS - 1)
    return total.astype(np.float64) * step - weight_sum * clip


def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform uint64 words from a 32-byte seed (ChaCha20 key stream)."""
    if len(seed) != 32:
        raise SecAggError("a mask seed must be 32 bytes")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * size)), dtype="<u8").astype(np.uint64)


def new_private_key() -> bytes:
    """A fresh X25519 private key (raw 32 bytes)."""
    return x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_key(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    key = x25519.X25519PrivateKey.from_private_bytes(private).public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: bytes, public: bytes, *, purpose: bytes) -> bytes:
    """A 32-byte key both holders of the pair derive (X25519 + HKDF-SHA256)."""
    try:
        secret = x25519.X25519PrivateKey.from_private_bytes(private).exchange(
            x25519.X25519PublicKey.from_public_bytes(public)
        )
    except ValueError as e:
        raise SecAggError(f"bad public key: {e}") from None
    return HKDF(hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


def pair_mask(private: bytes, own: int, other: int, other_public: bytes, size: int) -> np.ndarray:
    """Site ``own``'s mask for the pair with ``other``: +PRG(s) when own < other, else −PRG(s),
    so the pair's masks cancel in the sum."""
    mask = prg(agree(private, other_public, purpose=b"fedbridge secagg mask"), size)
    return mask if own < other else (np.uint64(0) - mask)


def masked_input(
    delta: np.ndarray,
    *,
    weight: int,
    clip: float,
    seed: bytes,
    own: int,
    mask_key: bytes,
    peers: dict[int, bytes],
) -> tuple[np.ndarray, int]:
    """``weight·q(delta) + PRG(seed) + Σ pair masks`` (mod 2⁶⁴) and the count of clipped
    values; ``peers`` maps each other participant to its public mask key."""
    q, clipped = quantize(delta, clip)
    with np.errstate(over="ignore"):
        y = q * np.uint64(weight) + prg(seed, q.size)
        for other, public in peers.items():
            if other != own:
                y += pair_mask(mask_key, own, other, public, q.size)
    return y, clipped
