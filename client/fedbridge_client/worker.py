"""A site's long-lived worker: the model library and the site's decoded images stay loaded
between the messages of a run, and between runs.

Flower's SuperNode starts a fresh ``flwr-clientapp`` process for every message; importing
torch and timm and decoding the site's images in each made a deployed round ~50× slower than
a simulated one. `site join` starts one worker per site; the ClientApp (node-config
``worker-socket``) hands it each task over a Unix socket in a folder only the site's user can
open, and returns its reply. One task at a time, as Flower sends them.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from fedbridge_client.wire import WireError, recv_frame, send_frame

log = logging.getLogger("fedbridge.worker")
READY = "fedbridge site worker ready"  # logged once the socket accepts tasks


class Worker:
    """Serves train/evaluate tasks for one site's data folder."""

    def __init__(self, data: Path, name: str, label_map: dict | None = None) -> None:
        import torch  # noqa: F401  (loaded once, here, not per message)

        from fedbridge_client.site import Site

        self.data, self.name, self.label_map = Path(data), name, label_map or {}
        self.site = Site(self.data, name, self.label_map)
        self._seen = _fingerprint(self.data)

    def _current_site(self):
        """The site, re-indexed when files were added, removed or changed since the last task."""
        from fedbridge_client.site import Site

        now = _fingerprint(self.data)
        if now != self._seen:
            log.info("the data folder changed: re-reading it")
            self.site, self._seen = Site(self.data, self.name, self.label_map), now
        return self.site

    def handle(self, header: dict, arrays: dict) -> tuple[dict, dict]:
        """Answer one task of fedbridge's closed schema; anything else is refused."""
        from fedbridge_shared.protocol import WEIGHTS, RoundTask, task_problem
        from fedbridge_shared.weights import pack

        problem = task_problem(header, list(arrays))
        if problem is not None:
            raise WireError(f"refused a task outside fedbridge's schema: {problem}")
        site = self._current_site()
        task = RoundTask.from_config(header["config"])
        state = arrays[WEIGHTS]
        if header.get("kind") == "train":
            new_state, reply = site.train(task, state)
            weights = {WEIGHTS: pack(new_state)}
            return {"ok": True, "metrics": reply.to_metrics(), "site": site.name}, weights
        if header.get("kind") == "evaluate":
            reply = site.evaluate(task, state)
            return {"ok": True, "metrics": reply.to_metrics(), "site": site.name}, {}
        raise WireError(f"unknown task kind {header.get('kind')!r}")

    def serve(self, path: Path) -> None:
        """Accept tasks on ``path`` until this process is stopped."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            os.chmod(path, 0o600)
            server.listen(4)
            log.info("%s on %s (site %s)", READY, path, self.site.name)
            while True:
                conn, _ = server.accept()
                with conn:
                    self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        try:
            header, arrays = recv_frame(conn)
        except (WireError, OSError, ValueError) as e:
            log.warning("dropped a malformed task: %s", e)
            return
        try:
            reply, weights = self.handle(header, arrays)
        except Exception as e:  # the server is told a code and a count; the text stays here
            failure = _failure(e)
            log.error("task failed (%s): %s", failure.code.value, failure)
            reply = {"ok": False, "error": failure.code.value, "count": failure.count}
            weights = {}
        try:
            send_frame(conn, reply, weights)
        except OSError as e:  # the ClientApp was stopped (run ended); the next task will come
            log.warning("could not deliver a reply: %s", e)


def _failure(e: BaseException):
    from fedbridge_shared.protocol import SiteErrorCode, SiteFailure, as_failure

    if isinstance(e, WireError):
        return SiteFailure(str(e), code=SiteErrorCode.BAD_TASK)
    return as_failure(e)


def _fingerprint(folder: Path) -> frozenset[tuple[str, int, int]]:
    """Every file under ``folder`` with its size and mtime: cheap, no image is read."""
    out = []
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out.append((os.path.join(root, f), st.st_size, st.st_mtime_ns))
    return frozenset(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedbridge_client.worker")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--owner", default="", help="marker `site join` finds strays by")
    parser.add_argument("--label-map", action="append", default=[], help="as `site join`'s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        from fedbridge_shared.shortcut import parse_label_map

        worker = Worker(args.data, args.name, parse_label_map(args.label_map))
        worker.serve(args.socket)
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        log.error("site worker stopped: %s: %s", type(e).__name__, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
