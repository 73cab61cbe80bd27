"""Run untrusted generated code: one `python -I` subprocess per program, in its own temp dir and
process group, with a wall-clock timeout, resource limits and no network.

No exec() in this process: whatever the candidate does (loops forever, segfaults, calls exit(0),
floods stdout, forks), the harness only sees a status. A program passes only when it exits 0 AND
prints a per-run random token after its last statement, so `sys.exit(0)` inside a candidate is a
failure, not a pass. Network: the child runs in a fresh network namespace (`unshare -n`) where the
system allows it, and `socket` is disabled by a preamble either way.
"""
from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

DEFAULT_TIMEOUT = 5.0
DEFAULT_WORKERS = 2
MEMORY_BYTES = 1 << 30  # address-space cap of the child
FILE_BYTES = 16 << 20  # largest file the child may write (stdout and stderr go to files too)

# Runs first in the child. Limits are set from inside so no preexec_fn (unsafe with threads) is needed.
_PREAMBLE = '''\
import resource as _r, socket as _s
for _lim, _v in ((_r.RLIMIT_AS, {mem}), (_r.RLIMIT_FSIZE, {fsize}), (_r.RLIMIT_CORE, 0), (_r.RLIMIT_CPU, {cpu})):
    try:
        _r.setrlimit(_lim, (_v, _v))
    except (ValueError, OSError):
        pass
class _NoNetwork(_s.socket):
    def __init__(self, *a, **k):
        raise OSError("network access is disabled while evaluating generated code")
def _no_network(*a, **k):
    raise OSError("network access is disabled while evaluating generated code")
_s.socket = _NoNetwork
_s.create_connection = _s.getaddrinfo = _s.socketpair = _no_network
del _r, _s, _lim, _v, _NoNetwork, _no_network
'''


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed", "failed" (non-zero exit or no pass token), "timeout"
    seconds: float
    error: str = ""  # the last line of stderr, for failures

    def to_json(self) -> dict:
        return {"passed": self.passed, "status": self.status, "seconds": round(self.seconds, 3), "error": self.error}


@functools.lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """`unshare -n` when this machine lets us create a network namespace, else nothing."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    try:
        ok = subprocess.run([exe, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "-n", "--") if ok else ()


def _child_env(workdir: str) -> dict:
    env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return env


def _tail_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [x for x in data.splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def run_program(code: str, timeout: float = DEFAULT_TIMEOUT) -> ExecResult:
    """Run `code` as a script in a fresh subprocess; passed iff it runs to its end and exits 0."""
    token = secrets.token_hex(16)
    cpu = max(1, int(timeout) + 1)
    program = (_PREAMBLE.format(mem=MEMORY_BYTES, fsize=FILE_BYTES, cpu=cpu) + "\n" + code
               + f"\n\nprint({token!r}, flush=True)\n")
    workdir = tempfile.mkdtemp(prefix="unmask-exec-")
    t0 = time.perf_counter()
    try:
        script = os.path.join(workdir, "candidate.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(program)
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([*_netns_prefix(), sys.executable, "-I", "-B", script], cwd=workdir,
                                    env=_child_env(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return ExecResult(False, "timeout", time.perf_counter() - t0, f"timed out after {timeout:g} s")
            finally:
                _kill_group(proc)  # nothing it forked outlives it
        seconds = time.perf_counter() - t0
        if rc == 0 and _tail_line(out_path) == token:
            return ExecResult(True, "passed", seconds)
        error = _tail_line(err_path) or (f"exit code {rc}" if rc else "exited before the end of the program")
        return ExecResult(False, "failed", seconds, error)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_programs(codes: Sequence[str], timeout: float = DEFAULT_TIMEOUT, workers: int = DEFAULT_WORKERS,
                 cache: dict | None = None) -> list[ExecResult]:
    """Run many programs, at most `workers` at a time; results in input order.

    A program that does not compile fails without a subprocess (it would die of the SyntaxError).
    `cache` (program text -> result) lets repeated identical programs run once.
    """
    cache = {} if cache is None else cache
    todo = []
    for code in dict.fromkeys(codes):
        if code in cache:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compile(code, "<candidate>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as e:
            cache[code] = ExecResult(False, "failed", 0.0, f"{type(e).__name__}: {e}"[:300])
            continue
        todo.append(code)
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            cache.update(zip(todo, pool.map(lambda c: run_program(c, timeout), todo)))
    return [cache[c] for c in codes]
