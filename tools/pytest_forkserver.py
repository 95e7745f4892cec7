"""A fork server for pytest: the imports paid once, each test run a fork (for tools/mutation.py).

    python tools/pytest_forkserver.py serve SOCKET MUTATED [MODULE ...]  # where the tests run
    python tools/pytest_forkserver.py run SOCKET [PYTEST ARGS ...]

`serve` compiles the folder's Python files to bytecode, all but MUTATED (the file a mutation run
changes between runs), and imports pytest, its plugins and the given third-party modules (torch,
hypothesis: never the project's own), then answers each `run` with a forked child that runs
`pytest.main(ARGS)` with the client's stdout and stderr, and hands back its exit status: `run`
behaves as `python -m pytest ARGS` would, less the one to three seconds of imports and
compilation. A client that goes away (a timeout kills it) takes its child with it. One run at a
time; no bytecode is written after the start, so MUTATED is always compiled afresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import traceback
from pathlib import Path


def serve(path: str, mutated: str, modules: list[str]) -> None:
    import compileall
    import importlib
    import re

    skip = re.compile(rf"(^|/){re.escape(os.path.normpath(mutated))}$")
    compileall.compile_dir(".", quiet=1, rx=skip)
    for pyc in Path(mutated).parent.glob(f"__pycache__/{Path(mutated).stem}.*.pyc"):
        pyc.unlink()  # a stale one would hide the mutants (pyc freshness is by second)
    sys.dont_write_bytecode = True
    sys.path.insert(0, os.getcwd())  # as `python -m pytest` does
    from importlib.metadata import entry_points

    import pytest  # noqa: F401

    for module in [ep.value for ep in entry_points(group="pytest11")] + modules:
        importlib.import_module(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            _answer(conn)


def _answer(conn: socket.socket) -> None:
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
    args = json.loads(msg)
    pid = os.fork()
    if pid == 0:  # the child: pytest on the client's stdout and stderr
        code = 3
        try:
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            import pytest

            # the plugins were imported before pytest could rewrite their asserts: harmless
            code = int(pytest.main(["-W", "ignore::pytest.PytestAssertRewriteWarning", *args]))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([conn, pidfd], [], [])
        if pidfd not in ready:  # the client went away (or spoke out of turn)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    code = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(OSError):  # the client may have gone
        conn.sendall(str(code if code >= 0 else 128 - code).encode())


def run(path: str, args: list[str]) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        sys.stdout.flush()
        socket.send_fds(conn, [json.dumps(args).encode()], [1, 2])
        reply = conn.recv(16)
    return int(reply) if reply else 1


if __name__ == "__main__":
    command, path, *rest = sys.argv[1:]
    if command == "serve":
        serve(path, rest[0], rest[1:])
    else:
        sys.exit(run(path, rest))
