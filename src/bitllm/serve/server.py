"""Run the app with uvicorn: `serve` (blocking, for the CLI) and `Server` (a background thread, for
tests, benchmarks and notebooks)."""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time

import uvicorn

from bitllm.serve.app import ServeConfig, create_app


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(llm, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          log_level: str = "info") -> None:
    """Serve `llm` until interrupted. Binds loopback unless `host` says otherwise."""
    cfg = config or ServeConfig()
    if not _is_loopback(host) and not cfg.api_key:
        print(f"bitllm: warning: listening on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    uvicorn.run(create_app(llm, cfg), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """The app on loopback in a background thread: `with Server(llm, cfg) as s: s.url ...`."""

    def __init__(self, llm, config: ServeConfig | None = None, host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning") -> None:
        self.app = create_app(llm, config)
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=self.port, log_level=log_level,
                                                     timeout_graceful_shutdown=2, lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="bitllm-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread.start()
        t0 = time.monotonic()
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)

    @property
    def engine(self):
        return self.app.state.engine

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
