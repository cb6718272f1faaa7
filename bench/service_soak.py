"""Soak and persistence benchmark of `osfn-dist serve` (issue 12).

    python bench/service_soak.py                         # cost table + 64 clients × 30 s soak
    python bench/service_soak.py --seconds 20 --clients 64 --jobs 256
    python bench/service_soak.py --skip-cost             # the soak only

Runs the real server (`python -m osfn_dist.cli serve`, d = 4, token, loopback) in a
subprocess and talks to it with `GrpcExchange` threads in this process.

1. Persistence cost: the median of sequential exchanges (round robin over the jobs) with
   1, 64 and 256 jobs on the server, without and with `--state-file`; the difference is
   what persisting costs per exchange.
2. Soak: `--clients` threads for `--seconds`, `--jobs` jobs (each client cycles over its
   share), `--state-file` on; latency p50/p99 of every exchange, the number of exchanges
   and errors, and the server's RSS before and after (VmRSS from /proc).

Numbers depend on the disk (fdatasync) and on how many cores the clients and the server
share; the script prints what it measured and the machine it ran on.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from osfn_dist.dataflow.messages import Report  # noqa: E402
from osfn_dist.service.client import GrpcExchange  # noqa: E402

TOKEN = "soak-token"
D = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, workdir: Path, state_file: bool, max_jobs: int):
        token = workdir / "token"
        token.write_text(TOKEN)
        self.port = free_port()
        cmd = [sys.executable, "-m", "osfn_dist.cli", "serve", "--port", str(self.port), "--token-file", str(token),
               "--metrics-port", "-1", "--subspace-dim", str(D), "--max-jobs", str(max_jobs)]
        if state_file:
            cmd += ["--state-file", str(workdir / "state.pt")]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in self.proc.stdout:
            if "listening on" in line:
                break
        else:
            raise RuntimeError("the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        return kb / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Job:
    """One job's client side: its next step and basis version."""

    def __init__(self, port: int, name: str, seed: int):
        self.ex = GrpcExchange(f"127.0.0.1:{port}", token=TOKEN, job=name, timeout=10.0, retries=0)
        self.step, self.version = 0, 0
        self.gen = torch.Generator().manual_seed(seed)

    def exchange(self) -> float:
        y = torch.randn(D, generator=self.gen, dtype=torch.float64)
        report = Report(step=self.step + 1, basis_version=self.version, grad_coords=y, grad_sqnorm=float(y @ y) * 3)
        start = time.perf_counter()
        update = self.ex.exchange(report)
        elapsed = time.perf_counter() - start
        self.step, self.version = update.step, update.new_version
        return elapsed


def populate(port: int, n: int) -> list[Job]:
    jobs = [Job(port, f"job{i}", i) for i in range(n)]
    for job in jobs:
        for _ in range(3):
            job.exchange()
    return jobs


def cost_table(rounds: int) -> None:
    print("## Persistence cost per exchange (sequential, round robin over the jobs; median ms)\n")
    print("| jobs | no state file | --state-file | added |")
    print("|---:|---:|---:|---:|")
    for n in (1, 64, 256):
        medians = []
        for state in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                srv = Server(Path(tmp), state, max_jobs=max(n, 1))
                try:
                    jobs = populate(srv.port, n)
                    times = [jobs[i % n].exchange() for i in range(rounds)]
                    medians.append(statistics.median(times) * 1e3)
                finally:
                    srv.stop()
        print(f"| {n} | {medians[0]:.2f} | {medians[1]:.2f} | {medians[1] - medians[0]:+.2f} |", flush=True)
    print()


def soak(clients: int, seconds: float, n_jobs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp), True, max_jobs=n_jobs)
        try:
            jobs = populate(srv.port, n_jobs)
            rss_before = srv.rss_mib()
            size_before = os.path.getsize(Path(tmp) / "state.pt")
            latencies: list[list[float]] = [[] for _ in range(clients)]
            errors: list[str] = []
            stop_at = time.monotonic() + seconds
            barrier = threading.Barrier(clients)

            def client(i: int) -> None:
                mine = jobs[i::clients] or [jobs[i % n_jobs]]
                barrier.wait()
                k = 0
                while time.monotonic() < stop_at:
                    try:
                        latencies[i].append(mine[k % len(mine)].exchange())
                    except Exception as exc:  # reported below
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                        break
                    k += 1

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rss_after = srv.rss_mib()
            size_after = os.path.getsize(Path(tmp) / "state.pt")
        finally:
            srv.stop()
    flat = sorted(x for per in latencies for x in per)
    p = lambda q: flat[min(len(flat) - 1, int(q * len(flat)))] * 1e3  # noqa: E731
    print(f"## Soak: {clients} clients × {seconds:g} s, {n_jobs} jobs, --state-file\n")
    print(f"- exchanges: {len(flat)} ({len(flat) / seconds:.0f}/s), errors: {len(errors)}")
    if errors:
        print(f"  - first error: {errors[0]}")
    print(f"- latency: p50 {p(0.50):.1f} ms, p99 {p(0.99):.1f} ms, max {flat[-1] * 1e3:.1f} ms")
    print(f"- server RSS: {rss_before:.1f} MiB before, {rss_after:.1f} MiB after ({rss_after - rss_before:+.1f})")
    print(f"- state file: {size_before / 1024:.0f} KiB before, {size_after / 1024:.0f} KiB after (compacted as it grows)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--jobs", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=300, help="sequential exchanges per cost measurement")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--skip-soak", action="store_true")
    args = ap.parse_args()
    print(f"# osfn-dist serve soak — {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    if not args.skip_cost:
        cost_table(args.rounds)
    if not args.skip_soak:
        soak(args.clients, args.seconds, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
