"""What one process hop costs on this machine when it is idle: a write to a loopback TCP socket
until its reader, another process blocked in `recv`, runs.

    python bench/wakeup.py [--probes 200] [--gap-ms 100] [--work-us 200]      (Linux)

Each probe the writer sends one byte and then keeps its core busy for `--work-us` (the rest of a
handler after its write); the reader stamps `time.monotonic_ns()` as `recv` returns and answers
with the stamp and the CPU it ran on. Two placements, alternating probe by probe:

  free:   neither process pinned: the kernel places the woken reader (on some VM kernels
          beside the writer, on its busy vCPU, leaving the other one idle);
  other:  writer and reader pinned to different CPUs: the wake-up crosses to an idle CPU
          (on a VM, a halted vCPU that the host must run again).

Prints, per placement, the wake-up latency (p50, p90), how often the reader ran on the writer's
CPU and how often the writer was preempted during its write and work. The gateway + replica
path makes two such hops more than the embedded server for each request (the add, the first
token's line), so on an idle machine their wake-ups are a floor under what the remote path costs
(docs/deployment.md).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import signal
import socket
import time
from typing import Any, BinaryIO

import _record
from _stats import percentile

_libc = ctypes.CDLL(None, use_errno=True)


def current_cpu() -> int:
    return int(_libc.sched_getcpu())


def spin_us(us: float) -> None:
    end = time.perf_counter_ns() + int(us * 1000)
    while time.perf_counter_ns() < end:
        pass


def reader(port: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while conn.recv(1):
        stamp = time.monotonic_ns()
        conn.sendall(f"{stamp} {current_cpu()}\n".encode())


def probe(conn: socket.socket, replies: BinaryIO, work_us: float) -> tuple[float, bool, bool]:
    """(wake-up latency in ms, the reader ran on the writer's CPU, the writer was preempted)"""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
    cpu = current_cpu()
    sent = time.monotonic_ns()
    conn.send(b"x")
    spin_us(work_us)
    preempted = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw > before
    stamp, reader_cpu = replies.readline().split()
    return (int(stamp) - sent) / 1e6, int(reader_cpu) == cpu, preempted


def start_reader(cpu: int | None) -> tuple[socket.socket, BinaryIO, int]:
    """A forked reader (pinned to `cpu` if given), the writer's end of its connection and the
    reader's replies (one line each)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    pid = os.fork()
    if pid == 0:
        try:
            listener.close()
            reader(port, cpu)
        finally:
            os._exit(0)
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn, conn.makefile("rb"), pid


def summary(samples: list[tuple[float, bool, bool]]) -> dict[str, Any]:
    latencies = [s[0] for s in samples]
    return {
        "probes": len(samples),
        "wake_ms_p50": percentile(latencies, 50),
        "wake_ms_p90": percentile(latencies, 90),
        "on_writers_cpu": sum(s[1] for s in samples),
        "writer_preempted": sum(s[2] for s in samples),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--probes", type=int, default=200, help="probes per placement")
    ap.add_argument("--gap-ms", type=float, default=100.0, help="quiet time before each probe")
    ap.add_argument("--work-us", type=float, default=200.0, help="writer's work after writing")
    _record.add_arguments(ap)
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    placements: dict[str, tuple[int | None, int | None]] = {"free": (None, None)}
    if len(cpus) > 1:
        placements["other"] = (cpus[0], cpus[1])  # (writer's CPU, reader's CPU)
    else:
        print("one CPU: only the free placement")
    mask = set(cpus)
    samples: dict[str, list[tuple[float, bool, bool]]] = {name: [] for name in placements}
    readers = {name: start_reader(reader_cpu) for name, (_, reader_cpu) in placements.items()}
    try:
        for _ in range(args.probes):
            for name, (writer_cpu, _) in placements.items():
                os.sched_setaffinity(0, mask if writer_cpu is None else {writer_cpu})
                time.sleep(args.gap_ms / 1000)
                conn, replies, _ = readers[name]
                samples[name].append(probe(conn, replies, args.work_us))
    finally:
        os.sched_setaffinity(0, mask)
        for conn, replies, pid in readers.values():  # each reader holds the others' sockets too
            replies.close()
            conn.close()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

    figures: dict[str, Any] = {"work_us": args.work_us, "gap_ms": args.gap_ms}
    print(f"{args.probes} probes per placement, {args.gap_ms:g} ms apart; the writer works "
          f"{args.work_us:g} us after each write")  # fmt: skip
    for name, got in samples.items():
        fig = figures[name] = summary(got)
        print(
            f"{name:6} wake-up p50 {fig['wake_ms_p50']:.3f} ms, p90 {fig['wake_ms_p90']:.3f} ms; "
            f"reader on the writer's CPU {fig['on_writers_cpu']}/{fig['probes']}, "
            f"writer preempted {fig['writer_preempted']}/{fig['probes']}"
        )
    _record.write(args, __file__, figures)


if __name__ == "__main__":
    main()
