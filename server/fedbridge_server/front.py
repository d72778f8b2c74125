"""A closed control plane: the sites reach only the SuperLink's Fleet API.

Flower 1.42's SuperLink serves its Fleet (``/v1/fleet``), Control (``/v1/control``: register
keys, list and stop runs) and Runtime (``/v1/runtime``) APIs on one HTTP port. fedbridge
therefore runs the SuperLink on loopback and puts nginx (a Debian package) on the address the
sites use: TLS terminated there with the certificate from ``fedbridge server certs``, only
``/v1/fleet/`` passed on, everything else answered ``403`` with a JSON reason. The coordinator's
own tools (``flwr``, the ServerApp) talk to the loopback SuperLink.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fedbridge_shared.errors import ConfigError

SITE_PATHS = ("/v1/fleet/",)  # what a SuperNode needs; see the module docstring


@dataclass(frozen=True)
class Front:
    """nginx on ``host:port`` (the sites' address) in front of the SuperLink on ``upstream``."""

    host: str
    port: int
    upstream: str  # "127.0.0.1:PORT" of the SuperLink
    cert: Path
    key: Path
    ca: Path  # verifies the SuperLink's certificate on loopback
    folder: Path  # nginx's config, pid, logs and temp folders

    @staticmethod
    def binary() -> str:
        found = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
        )
        if found is None:
            raise ConfigError(
                "the coordinator keeps Flower's Control API off the sites' network with nginx, "
                "which is not installed: apt-get install nginx-light (or pass --insecure for a "
                "rehearsal on one machine)"
            )
        return found

    def config(self) -> str:
        f = self.folder.resolve()
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        passes = "\n".join(
            f"""        location {path} {{
            proxy_pass https://fedbridge_superlink;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate {self.ca.resolve()};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}"""
            for path in SITE_PATHS
        )
        return f"""# written by fedbridge server start; replaced on every start
worker_processes 1;
pid {f}/nginx.pid;
error_log {f}/error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log {f}/access.log;
    client_body_temp_path {f}/tmp/body;
    proxy_temp_path {f}/tmp/proxy;
    fastcgi_temp_path {f}/tmp/fastcgi;
    uwsgi_temp_path {f}/tmp/uwsgi;
    scgi_temp_path {f}/tmp/scgi;
    client_max_body_size 0;
    server_tokens off;
    upstream fedbridge_superlink {{
        server {self.upstream};
        keepalive 16;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {self.cert.resolve()};
        ssl_certificate_key {self.key.resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
{passes}
        location / {{
            default_type application/json;
            return 403 '{{"error": "fedbridge: only the Fleet API is open to sites"}}';
        }}
    }}
}}
"""

    def write(self) -> Path:
        """Write nginx.conf (and its folders); returns its path."""
        for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        path = self.folder / "nginx.conf"
        path.write_text(self.config())
        return path

    def command(self) -> list[str]:
        conf = self.write()
        folder = self.folder.resolve()
        # -e: the startup error log too, so a non-root coordinator never touches /var/log/nginx
        return [
            self.binary(), "-p", str(folder), "-c", str(conf.resolve()),
            "-e", str(folder / "error.log"),
        ]  # fmt: skip
