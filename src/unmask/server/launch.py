"""Running the app: `serve()` for `unmask serve`, `LiveServer` for tests and benchmarks.

We bind the listening socket ourselves so that a busy port is a one-line UserError (exit 2) rather
than uvicorn's exit, and so that port 0 works and the startup line still shows the real URL.
"""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from ..errors import UserError


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --host or --port") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


def serve(model_path=None, host: str = "127.0.0.1", port: int = 8000, *, cfg=None, engine_options=None,
          device: str = "auto") -> None:
    """Load the model, bind, and serve until SIGINT/SIGTERM; then stop accepting and drain."""
    from ..engine import Engine
    from ..pretrained import load
    from .app import ServerConfig, create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    cfg = cfg or ServerConfig()
    device = pick_device(device)
    sock = bind(host, port)
    model = load(model_path, device=device)
    engine = Engine(model, max_batch=cfg.max_batch, **(engine_options or {}))
    cfg.url = url_of(sock)
    if host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        logging.getLogger("unmask.server").warning("listening on %s without an API key; anyone who can reach "
                                                   "this address can use the model", host)
    app = create_app(model, cfg, engine)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=int(cfg.request_timeout) + 5,
                            access_log=True)
    uvicorn.Server(config).run(sockets=[sock])


class LiveServer:
    """The app on a free loopback port, in a background thread of this process.

    with LiveServer(app) as srv: httpx.get(srv.url + "/health")
    Leaving the block shuts down the way SIGTERM does: in-flight requests finish first.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)

    def start(self, timeout: float = 30) -> "LiveServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
