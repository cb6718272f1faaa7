"""``osfn-dist serve`` (the standalone curvature server) and ``osfn-dist status``.

    osfn-dist serve --host 0.0.0.0 --port 50051 --token-file /etc/osfn/token --metrics-port 9400 \\
        --subspace-dim 8 --state-file /var/lib/osfn/curvature.pt
    osfn-dist status --address host:50051 --token-file /etc/osfn/token [--job J] [--watch] [--json]

grpc (and prometheus_client for --metrics-port) are imported only when a command runs, so
``osfn-dist --help`` works without them.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9400


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the standalone curvature server (gRPC)",
        description="Serve the curvature service over gRPC: one curvature model per training job.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; "
                       "anything but loopback needs a token)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (default %(default)s; 0 = any)")
    serve.add_argument("--token-file", help="file holding the bearer token (else $OSFN_TOKEN)")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert")
    serve.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                       help="Prometheus /metrics port (default %(default)s; -1 = off)")
    serve.add_argument("--metrics-host", help="address for /metrics (default: --host)")
    serve.add_argument("--subspace-dim", type=int, default=None, help="subspace size d (default 8)")
    serve.add_argument("--config", help="YAML file whose 'optimizer:' section holds OSFNConfig fields")
    serve.add_argument("--state-file", help="save every job's curvature state here (an append-only, checksummed "
                       "log; its directory must exist; locked against a second server) and resume from it")
    serve.add_argument("--save-every", type=int, default=1,
                       help="save a job every N of its exchanges (default 1: before each reply; "
                       "0: only at shutdown)")
    serve.add_argument("--max-message-bytes", type=int, default=8 * 1024 * 1024)
    serve.add_argument("--max-jobs", type=int, default=256)
    serve.add_argument("--max-workers", type=int, default=64,
                       help="gRPC handler threads (>= 4; WatchState streams may use half, Health/Watch an eighth)")
    serve.add_argument("--allow-stale", action="store_true",
                       help="accept reports one basis version behind (pipelined workers)")
    serve.set_defaults(func=serve_main)

    status = subparsers.add_parser(
        "status", help="print the live curvature spectrum of a server",
        description="Eigenvalues, negative-curvature count, versions and step of each job.",
    )
    status.add_argument("--address", default=f"127.0.0.1:{DEFAULT_PORT}", help="HOST:PORT of osfn-dist serve")
    status.add_argument("--token-file", help="file holding the bearer token (else $OSFN_TOKEN)")
    status.add_argument("--tls-ca", help="PEM CA bundle: connect with TLS")
    status.add_argument("--tls", action="store_true", help="TLS with the system's CA bundle")
    status.add_argument("--job", help="only this job (default: every job on the server)")
    status.add_argument("--watch", action="store_true", help="print again after every exchange (needs one job)")
    status.add_argument("--count", type=int, default=0, help="with --watch: stop after N updates")
    status.add_argument("--json", action="store_true", help="one JSON object per job and line")
    status.add_argument("--timeout", type=float, default=5.0)
    status.set_defaults(func=status_main)


# ------------------------------------------------------------------ serve
def load_config(path: str | None, subspace_dim: int | None):
    from ..core.config import OSFNConfig
    from ..core.errors import ConfigError

    fields: dict = {}
    if path:
        try:
            import yaml
        except ModuleNotFoundError:
            raise ConfigError("--config needs PyYAML: pip install pyyaml") from None
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        fields = dict(data.get("optimizer") or {})
        unknown = set(fields) - set(OSFNConfig.field_names())
        if unknown:
            raise ConfigError(f"{path}: unknown optimizer fields {sorted(unknown)}")
        if "betas" in fields:
            fields["betas"] = tuple(fields["betas"])
    if subspace_dim is not None:
        fields["subspace_dim"] = subspace_dim
    fields.setdefault("subspace_dim", 8)
    return OSFNConfig(**fields)


def serve_main(args: argparse.Namespace) -> int:
    from ..core.errors import OSFNError
    from .auth import read_token
    from .server import CurvatureServer

    try:
        config = load_config(args.config, args.subspace_dim)
        token = read_token(None, args.token_file)
        metrics = None
        if args.metrics_port >= 0:
            from ..metrics.exporter import ServiceMetrics

            metrics = ServiceMetrics(worker="server")
        server = CurvatureServer(
            config, host=args.host, port=args.port, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
            state_file=args.state_file, save_every=args.save_every, max_message_bytes=args.max_message_bytes,
            max_jobs=args.max_jobs, max_workers=args.max_workers, allow_stale=args.allow_stale, metrics=metrics,
        )
        port = server.start()
        metrics_port = None
        if metrics is not None:
            metrics_port = metrics.serve(args.metrics_port, args.metrics_host or args.host)
    except (OSFNError, OSError) as exc:
        print(f"osfn-dist serve: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"osfn-dist serve: listening on {args.host}:{port} (d={config.subspace_dim}, "
        f"auth={'token' if token else 'off, loopback only'}, tls={'on' if args.tls_cert else 'off'}, "
        f"restored jobs={server.restored_jobs}"
        + (f", metrics on {args.metrics_host or args.host}:{metrics_port}" if metrics_port is not None else "")
        + ")",
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    try:
        server.stop(grace=2.0)
    except OSFNError as exc:
        print(f"osfn-dist serve: {exc}", file=sys.stderr)
        return 1
    finally:
        if metrics is not None:
            metrics.shutdown()
    print("osfn-dist serve: stopped" + (f", state saved to {args.state_file}" if args.state_file else ""), flush=True)
    return 0


# ----------------------------------------------------------------- status
def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:+.4g}"


def format_state(state: dict) -> str:
    eig = state["eigenvalues"]
    lines = [
        f"job {state['job']}: step {state['step']}, basis version {state['basis_version']}, "
        f"d={state['subspace_dim']} ({state['alive_directions']} alive), exchanges {state['exchanges']}",
        f"  eigenvalues       [{', '.join(_fmt(v) for v in eig)}]",
        f"  negative curvature {state['negative_curvature']} of {len(eig)}",
        f"  noise ratio {state['noise_ratio']:.4g}   rotation {state['rotation_angle_deg']:.3g}°   "
        f"subspace step {state['subspace_step_norm']:.4g}   eigh fallbacks {state['eigh_fallbacks']}",
    ]
    return "\n".join(lines)


def status_main(args: argparse.Namespace) -> int:
    from ..core.errors import OSFNError
    from .client import CurvatureClient

    def show(state: dict) -> None:
        print(json.dumps(state) if args.json else format_state(state), flush=True)

    try:
        client = CurvatureClient(
            args.address, token_file=args.token_file, tls_ca=args.tls_ca, tls=args.tls,
            timeout=args.timeout, retries=1, backoff=0.2,
        )
        with client:
            if args.watch:
                job = args.job or "default"
                for i, state in enumerate(client.watch_state(job), 1):
                    show(state)
                    if args.count and i >= args.count:
                        break
                return 0
            jobs = [args.job] if args.job else client.list_jobs()
            if not jobs:
                print(f"{args.address}: serving, no jobs yet")
                return 0
            for job in jobs:
                show(client.get_state(job))
    except (OSFNError, LookupError) as exc:
        print(f"osfn-dist status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
