"""A site's side of secure aggregation (see :mod:`fedbridge_shared.secagg`).

Four steps per round, each a message from the coordinator; between them the site keeps its
secrets in ``state`` (a dict of bytes/ints, the node's Flower ``Context.state`` when deployed):

1. ``setup``: two fresh X25519 key pairs (one encrypts shares, one derives masks) → publics.
2. ``share``: a private seed ``b``; Shamir shares of ``b`` and of the mask key, one per
   participant, each encrypted for its receiver (keys agreed pairwise) → ciphertexts.
3. ``mask``: after training, the masked update (the coordinator cannot read it alone).
4. ``unmask``: for each site that sent its masked update, its share of ``b``; for each
   site that dropped, its share of the mask key. Never both for one site, and never with fewer
   than the threshold of survivors: that would let the coordinator unmask one site.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt

from fedbridge_shared import secagg as S

_SHARE_PURPOSE = b"fedbridge secagg share"


def setup(state: dict) -> dict[str, bytes]:
    """New key pairs for this round; the public halves go to the coordinator."""
    state.clear()
    state["enc-key"], state["mask-key"] = S.new_private_key(), S.new_private_key()
    return {
        "enc-public": S.public_key(state["enc-key"]),
        "mask-public": S.public_key(state["mask-key"]),
    }


def _fernet_key(private: bytes, public: bytes) -> bytes:
    import base64

    return base64.urlsafe_b64encode(S.agree(private, public, purpose=_SHARE_PURPOSE))


def share(
    state: dict, *, own: int, publics: dict[int, tuple[bytes, bytes]], threshold: int
) -> dict[int, bytes]:
    """Ciphertexts for every other participant ``j`` (``publics``: id → (enc, mask) keys, own
    included): ``(own, j, share of b, share of the mask key)`` encrypted for ``j``."""
    ids = sorted(publics)
    if own not in publics or not 2 <= threshold <= len(ids):
        raise S.SecAggError(f"threshold {threshold} for {len(ids)} participants")
    state["seed"] = os.urandom(32)
    state["publics"] = {j: publics[j] for j in ids}
    state["threshold"] = threshold
    seed_shares = create_shares(state["seed"], threshold, len(ids))
    key_shares = create_shares(state["mask-key"], threshold, len(ids))
    out, inbox = {}, {}
    for k, j in enumerate(ids):
        plain = _pack(own, j, seed_shares[k], key_shares[k])
        if j == own:
            inbox[own] = plain  # our own shares stay here, unencrypted
        else:
            out[j] = encrypt(_fernet_key(state["enc-key"], publics[j][0]), plain)
    state["inbox"] = inbox
    return out


def mask(
    state: dict,
    *,
    own: int,
    participants: list[int],
    inbox: dict[int, bytes],
    delta: np.ndarray,
    weight: int,
    clip: float,
) -> tuple[np.ndarray, int]:
    """Keep the shares others sent us (``inbox``: sender → ciphertext), then the masked,
    ``weight``-scaled update and the count of clipped values. ``participants``: the sites
    whose shares the coordinator holds (a site that dropped before sharing is left out)."""
    if "seed" not in state:
        raise S.SecAggError("masking before the key exchange of this round")
    kept = set(participants)
    if own not in kept or not kept <= set(state["publics"]) or len(kept) < state["threshold"]:
        raise S.SecAggError(
            f"{len(kept)} participant(s) left, fewer than the threshold {state['threshold']}"
        )
    state["publics"] = {j: k for j, k in state["publics"].items() if j in kept}
    if set(inbox) != kept - {own}:
        raise S.SecAggError("shares missing from some participants")
    for sender, cipher in inbox.items():
        if sender not in state["publics"] or sender == own:
            raise S.SecAggError(f"a share from a non-participant ({sender})")
        key = _fernet_key(state["enc-key"], state["publics"][sender][0])
        src, dst, seed_share, key_share = _unpack(decrypt(key, cipher))
        if (src, dst) != (sender, own):
            raise S.SecAggError("a share addressed to another site")
        state["inbox"][sender] = _pack(src, dst, seed_share, key_share)
    peers = {j: keys[1] for j, keys in state["publics"].items() if j != own}
    state["masked"] = True
    return S.masked_input(
        delta, weight=weight, clip=clip, seed=state["seed"], own=own,
        mask_key=state["mask-key"], peers=peers,
    )  # fmt: skip


def unmask(state: dict, *, survivors: list[int], dropped: list[int]) -> dict[str, bytes]:
    """Shares the coordinator needs: ``seed-<j>`` for survivors, ``key-<j>`` for dropped."""
    if not state.get("masked"):
        raise S.SecAggError("unmasking before this site sent its masked update")
    if set(survivors) & set(dropped):
        raise S.SecAggError("a site listed both as survivor and as dropped")
    if len(set(survivors)) < state["threshold"]:
        raise S.SecAggError(
            f"{len(set(survivors))} survivor(s), fewer than the threshold {state['threshold']}"
        )
    out = {}
    for j in [*survivors, *dropped]:
        if j not in state["inbox"]:
            raise S.SecAggError(f"no share held for participant {j}")
        _, _, seed_share, key_share = _unpack(state["inbox"][j])
        out[f"seed-{j}" if j in survivors else f"key-{j}"] = (
            seed_share if j in survivors else key_share
        )
    state.clear()  # one round, one set of secrets
    return out


def _pack(src: int, dst: int, a: bytes, b: bytes) -> bytes:
    return struct.pack("<QQI", src, dst, len(a)) + a + b


def _unpack(data: bytes) -> tuple[int, int, bytes, bytes]:
    src, dst, n = struct.unpack_from("<QQI", data)
    body = data[20:]
    return src, dst, body[:n], body[n:]
