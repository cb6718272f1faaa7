"""``osfn-dist train``: flags and config file → TrainConfig → local or Ray run."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..core.errors import ConfigError, OSFNError
from .config import PARALLEL


def _epilog() -> str:
    from ..core.config import OSFNConfig
    from ..workloads.builtin import BUILTIN

    settings = ", ".join(f"{k}={v!r}" for k, v in OSFNConfig().as_dict().items())
    return (
        "built-in workloads: " + ", ".join(BUILTIN) + "\n\n"
        "OSFN settings go in the config file's 'optimizer:' section (defaults): " + settings
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a workload with OSFN (default: built-in MNIST-1D MLP)",
        # each flag's help states its own default; argparse's "(default: None)" would repeat it
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    p.add_argument("--workload", help="built-in name or package.module:function (default mnist1d_mlp)")
    p.add_argument("--steps", type=int, help="training steps (default: the workload's)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: the workload's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--run-dir", help="output directory (default runs/<workload>-<time>)")
    p.add_argument("--config", help="YAML file with train settings; flags override it")
    p.add_argument(
        "--backend", choices=("local", "ray"),
        help="ray: Ray Train workers (default when ray is installed); local: one process",
    )
    p.add_argument("--num-workers", type=int, help="Ray Train workers (data parallel; default 2)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto, ray://host:10001)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="GPU workers with NCCL")
    p.add_argument(
        "--staleness", type=int, choices=(0, 1),
        help="1: pipeline the curvature actor round trip behind the next forward/backward (default 0)",
    )
    p.add_argument(
        "--shard-basis", action="store_true", default=None,
        help="shard the subspace basis across workers: each keeps its slice's rows of V (1/N of its memory and "
             "of every pass over it), with --parallel ddp (default) or gradient_sync",
    )
    p.add_argument(
        "--parallel", choices=PARALLEL,
        help="how OSFN's workers share gradients: ddp (default; averaged overlapped with backward), "
             "fsdp2 (parameters and V sharded), gradient_sync (OSFN's own all-reduce, every worker's projection gathered)",
    )
    p.add_argument(
        "--worker-noise", action="store_true", default=None,
        help="with --parallel ddp: the curvature service estimates gradient noise from every worker's own "
             "projection (a DDP hook; off by default: it cost 15-19%% of a 2-worker CPU step)",
    )
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    p.add_argument("--resume-from", help="checkpoint directory, or a run directory to resume from its latest")
    p.add_argument("--storage-path", help="where checkpoints go (shared storage on multi-node clusters)")
    p.add_argument("--max-failures", type=int, help="restart the workers from the last checkpoint this many times")
    p.add_argument("--actor-timeout", type=float, help="seconds to wait for the curvature actor (default 120)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--optimizer", help="osfn | adamw | sgd (default osfn)")
    p.add_argument("--lr", type=float, help="learning rate (complement lr for OSFN)")
    p.add_argument("--subspace-dim", type=int, help="OSFN subspace size d")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print the whole summary (JSON) and Ray's own logs")
    p.set_defaults(func=run)


# flags only Ray Train workers can honour: the local backend refuses them instead of ignoring them
RAY_ONLY_FLAGS = {
    "num_workers": "--num-workers", "address": "--address", "use_gpu": "--use-gpu", "staleness": "--staleness",
    "shard_basis": "--shard-basis", "parallel": "--parallel", "storage_path": "--storage-path", "max_failures": "--max-failures",
    "actor_timeout": "--actor-timeout", "worker_noise": "--worker-noise",
}


def _refuse_for_local(args, cfg) -> None:
    given = [flag for key, flag in RAY_ONLY_FLAGS.items() if getattr(args, key, None) not in (None, False)]
    if cfg.backend == "local" and given:
        raise ConfigError(
            f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} Ray Train workers; "
            "the local backend runs one process. Drop --backend local (Ray is the default) or the flag")


def _check_gpus(cfg) -> None:
    """--use-gpu on a machine without CUDA: say so now, not after Ray's 60 s wait for GPUs."""
    if not cfg.use_gpu or cfg.backend != "ray" or cfg.address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < cfg.num_workers:
        raise ConfigError(
            f"--use-gpu with {cfg.num_workers} workers needs {cfg.num_workers} GPUs; this machine has {have} "
            f"(torch {torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'}). Drop --use-gpu, "
            "or join a GPU cluster with --address")


def _print_summary(summary: dict, verbose: bool) -> None:
    if verbose:
        print(json.dumps(summary, indent=2, default=float))
        return
    def fmt(v):
        return "n/a" if v is None else f"{v:.4g}"
    print(f"{summary['workload']} with {summary['optimizer']}: {summary['steps']} steps in "
          f"{summary['wall_seconds']:.1f} s on {summary['num_workers']} worker(s) ({summary['backend']})")
    print(f"  train loss {fmt(summary.get('final_loss'))}, test loss {fmt(summary.get('test_loss'))}")
    print(f"  results in {summary['run_dir']} (summary.json, metrics.jsonl, loss.png"
          + (", curvature.png" if summary["optimizer"] == "osfn" else "") + ")")


def config_from_args(args):
    from .config import TrainConfig

    flags = {
        "workload": args.workload,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "run_dir": args.run_dir,
        "backend": args.backend,
        "num_workers": args.num_workers,
        "address": args.address,
        "use_gpu": args.use_gpu,
        "metrics_port": args.metrics_port,
        "staleness": args.staleness,
        "shard_basis": args.shard_basis,
        "parallel": args.parallel,
        "worker_noise": args.worker_noise,
        "checkpoint_every": args.checkpoint_every,
        "resume_from": args.resume_from,
        "storage_path": args.storage_path,
        "max_failures": args.max_failures,
        "actor_timeout_s": args.actor_timeout,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    if args.address or args.num_workers or args.use_gpu or args.staleness or args.shard_basis or args.parallel or args.worker_noise:
        flags.setdefault("backend", "ray")
    base = TrainConfig.from_file(args.config).as_dict() if args.config else {}
    merged = {**base, **flags}
    opt = dict(merged.get("optimizer") or {"name": "osfn"})
    if args.optimizer:
        opt["name"] = args.optimizer
    if args.lr is not None:
        opt["lr"] = args.lr
    if args.subspace_dim is not None:
        opt["subspace_dim"] = args.subspace_dim
    merged["optimizer"] = opt
    return TrainConfig.from_dict(merged)


def run(args) -> int:
    # a user's workload (package.module:function) may live in the current directory, as
    # with `python -m`; Ray puts the driver's directory on the workers' path as well.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    from ..workloads import check_workload

    try:
        cfg = config_from_args(args)
        check_workload(cfg.workload)
        _refuse_for_local(args, cfg)
        _check_gpus(cfg)
        if cfg.resume_from:
            from .ray_checkpoint import find_checkpoint

            find_checkpoint(cfg.resume_from)  # before any run directory is written
    except (ConfigError, ValueError) as exc:
        print(f"osfn-dist train: {exc}", file=sys.stderr)
        return 2
    try:
        if cfg.backend == "ray":
            from .ray_trainer import train_ray  # needs the ray extra

            summary = train_ray(cfg, show_progress=not args.no_progress, verbose=args.verbose)
        else:
            from .local import train_local

            summary = train_local(cfg, show_progress=not args.no_progress)
    except OSFNError as exc:  # a checkpoint that does not fit, a port in use, ...: one sentence
        print(f"osfn-dist train: {exc}", file=sys.stderr)
        return 2
    _print_summary(summary, args.verbose)
    return 0
