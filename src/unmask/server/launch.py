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
          device: str = "auto", tensor_parallel: int = 1, adapter=None) -> None:
    """Load the model, bind, and serve until SIGINT/SIGTERM; then stop accepting and drain.

    tensor_parallel > 1: this process is one rank of a torchrun job of that many ranks
    (engine/tensor_parallel.py); rank 0 serves HTTP and drives the others' forwards."""
    from ..engine import Engine
    from ..pretrained import load
    from .app import ServerConfig, create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    cfg = cfg or ServerConfig()
    if tensor_parallel > 1:
        return _serve_tensor_parallel(model_path, host, port, cfg, engine_options or {}, device, tensor_parallel,
                                      adapter)
    device = pick_device(device)
    sock = bind(host, port)
    model = load(model_path, device=device, adapter=adapter)
    engine = Engine(model, max_batch=cfg.max_batch, **(engine_options or {}))
    _run_app(model, cfg, engine, sock, host)


def _run_app(model, cfg, engine, sock, host) -> None:
    from .app import create_app

    cfg.url = url_of(sock)
    if host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        logging.getLogger("unmask.server").warning("listening on %s without an API key; anyone who can reach "
                                                   "this address can use the model", host)
    app = create_app(model, cfg, engine)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=int(cfg.request_timeout) + 5,
                            access_log=True)
    uvicorn.Server(config).run(sockets=[sock])


def spawn_ranks(n: int, argv: list[str]) -> int:
    """Run `argv` as the n ranks of a one-machine job (the environment torchrun would give them) and
    wait. SIGINT/SIGTERM go to rank 0 alone: it drains its requests and then releases the others.
    Returns the first non-zero exit code, or 0."""
    import os
    import signal
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(n)}
    procs = [subprocess.Popen(argv, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              start_new_session=r > 0) for r in range(n)]  # a terminal's Ctrl-C reaches rank 0 only
    forward = lambda sig, _frame: procs[0].send_signal(sig)  # noqa: E731
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs[:1]]
        for p in procs[1:]:
            try:
                codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
    return next((c for c in codes if c), 0)


def _serve_tensor_parallel(model_path, host, port, cfg, engine_options, device, n: int, adapter=None) -> None:
    """One rank of `unmask serve --tensor-parallel n` under torchrun."""
    from ..engine import Engine, tensor_parallel
    from ..pretrained import load
    from ..train import distributed

    d = distributed.init()
    try:
        if d.world != n:
            raise UserError(f"--tensor-parallel {n} but torchrun started {d.world} ranks; make them equal "
                            f"(torchrun --nproc-per-node {n} ...) or leave torchrun out and let unmask start them")
        if device not in ("auto", str(d.device)) and not (device == "cuda" and d.device.type == "cuda"):
            raise UserError(f"--device {device}: under --tensor-parallel each rank uses its own device "
                            f"({d.device} here); leave --device out")
        unsupported = [k for k in ("quantize", "compile", "cuda_graphs") if engine_options.get(k)]
        if engine_options.get("backend", "torch") != "torch":
            unsupported.append("backend")
        if unsupported:
            raise UserError(f"--tensor-parallel runs the plain torch forward: drop --{unsupported[0].replace('_', '-')}")
        sock, err = None, None
        if d.main:
            try:
                sock = bind(host, port)
            except UserError as e:
                err = e
        if tensor_parallel.share(int(err is not None), d.device):  # every rank stops if rank 0 cannot bind
            if err is not None:
                raise err
            raise SystemExit(2)
        model = load(model_path, device="cpu", adapter=adapter)  # memory-mapped; each rank keeps only its shard on its device
        tensor_parallel.shard(model.net, n, d.device)
        if not d.main:
            tensor_parallel.worker(model)
            model = None
            return
        try:
            engine = Engine(model, max_batch=cfg.max_batch, **engine_options)
        except BaseException:
            tensor_parallel.Driver.fail(d.device)  # the workers wait for the engine: let them go
            raise
        logging.getLogger("unmask.server").info("tensor parallel over %d ranks (%s)", n, d.device.type)
        try:
            _run_app(model, cfg, engine, sock, host)
        finally:
            engine.core.tp_driver.stop()
            model = engine = None
    finally:
        distributed.leave()


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
