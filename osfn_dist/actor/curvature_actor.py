"""The curvature service as a Ray actor, and the exchange that talks to it.

``CurvatureActor`` is a thin wrapper: the math is the plain
:class:`osfn_dist.dataflow.curvature.CurvatureService`, the same class that runs in-process.
It is made remote by :func:`create_curvature_actor` (``num_cpus=0``: a side actor that asks
for a CPU starves Ray Train workers on small machines), named and namespaced so workers,
the driver and ``ray list actors`` can find it, owned by the driver (not detached: it ends
with the job).

Messages are the d-sized ``Report``/``DirectionUpdate`` in their wire form (lists and
floats), so their pickled size never depends on the model size; :class:`ActorExchange`
counts the bytes and times every round trip.

Restarts are never silent. A crashed actor is restarted by Ray (``max_restarts``) with an
empty service; it then refuses every report with :class:`CurvatureServiceUnavailable`
until someone restores it (``load_state_dict`` from the last checkpoint, or an explicit
``reset()``), so a worker can never go on against a curvature model that forgot everything.
"""
from __future__ import annotations

import collections
import pickle
import statistics
import time

from ..core.config import OSFNConfig
from ..core.errors import CurvatureServiceUnavailable, OSFNError
from ..dataflow.messages import DirectionUpdate, Report
from ..dataflow.curvature import CurvatureService

DEFAULT_NAMESPACE = "osfn-dist"
DEFAULT_TIMEOUT_S = 120.0


def wire_size(wire: dict) -> int:
    """Bytes of a message on the wire (its pickled wire form)."""
    return len(pickle.dumps(wire, protocol=pickle.HIGHEST_PROTOCOL))


_KV_NAMESPACE = "osfn-dist"


def _incarnation_key(actor_id: str) -> str:
    return f"curvature-actor-incarnation:{actor_id}"


def _was_reconstructed() -> bool:
    """True in a restarted incarnation of this actor. Two independent signals, so a failed
    query can never make a restarted (empty) actor pass for a fresh one: Ray's restart count,
    and a marker the first incarnation leaves in the GCS key-value store."""
    import warnings

    try:
        import ray
        from ray.experimental.internal_kv import _internal_kv_put

        actor_id = ray.get_runtime_context().get_actor_id()
        if actor_id is None:
            return False
    except Exception:  # not inside a Ray actor (unit tests call the class directly)
        return False
    restarted = False
    try:
        restarted = _internal_kv_put(_incarnation_key(actor_id), b"1", overwrite=False, namespace=_KV_NAMESPACE)
    except Exception:
        pass
    try:
        with warnings.catch_warnings():  # it reads the actor table through a deprecated helper
            warnings.simplefilter("ignore")
            restarted = restarted or bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:
        pass
    return bool(restarted)


class CurvatureActor:
    """Plain class; ``ray.remote`` is applied in :func:`create_curvature_actor`."""

    def __init__(self, config: OSFNConfig | dict | None = None, allow_stale: bool = False):
        if isinstance(config, dict):
            config = OSFNConfig(**{**config, "betas": tuple(config.get("betas", (0.9, 0.999)))})
        self.service = CurvatureService(config or OSFNConfig(), allow_stale=allow_stale)
        self.restarted = _was_reconstructed()
        self.needs_restore = self.restarted
        self.restored_from_step: int | None = None
        self.exchanges = 0

    def exchange(self, report_wire: dict) -> dict:
        if self.needs_restore:
            raise CurvatureServiceUnavailable(
                "the curvature actor was restarted after a crash and holds an empty curvature model; "
                "it refuses reports until it is restored from the last checkpoint (load_state_dict) "
                "or explicitly reset(). With Ray Train's FailureConfig(max_failures>0) the workers "
                "restart from the last checkpoint and restore it"
            )
        update = self.service.exchange(Report.from_wire(report_wire))
        self.exchanges += 1
        return update.to_wire()

    def ping(self) -> bool:
        return True

    def snapshot(self) -> dict:
        return {
            **self.service.snapshot(),
            "restarted": self.restarted,
            "needs_restore": self.needs_restore,
            "restored_from_step": self.restored_from_step,
            "exchanges": self.exchanges,
        }

    def state_dict(self) -> dict:
        if self.needs_restore:
            raise CurvatureServiceUnavailable("the curvature actor was restarted and not restored; it has no state to save")
        return self.service.state_dict()

    def load_state_dict(self, state: dict) -> dict:
        self.service.load_state_dict(state)
        self.needs_restore = False
        self.restored_from_step = self.service.step
        return self.snapshot()

    def reset(self) -> dict:
        """Start from an empty curvature model (a fresh run, no checkpoint)."""
        self.service.reset()
        self.needs_restore = False
        self.restored_from_step = None
        return self.snapshot()


def create_curvature_actor(
    config: OSFNConfig,
    *,
    name: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    allow_stale: bool = False,
    max_restarts: int = 3,
    **options,
):
    """Start the curvature actor; returns its handle. ``options`` go to ``.options()``
    (e.g. ``resources``, ``scheduling_strategy``, ``lifetime``)."""
    import ray

    opts = {
        "num_cpus": 0,
        "max_restarts": max_restarts,
        # a call in flight when the actor dies fails; it is never replayed on an empty actor
        "max_task_retries": 0,
        "namespace": namespace,
    }
    if name:
        opts["name"] = name
    opts.update(options)
    return ray.remote(CurvatureActor).options(**opts).remote(config, allow_stale)


def release_curvature_actor(actor) -> None:
    """Kill the actor (no restart) and drop its incarnation marker."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_del

    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass
    try:
        _internal_kv_del(_incarnation_key(actor._actor_id.hex()), namespace=_KV_NAMESPACE)
    except Exception:
        pass


def get_curvature_actor(name: str, namespace: str = DEFAULT_NAMESPACE):
    """The handle of a running curvature actor, or a clear error."""
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError as exc:
        raise CurvatureServiceUnavailable(
            f"no curvature actor named {name!r} in Ray namespace {namespace!r}: {exc}. Start it with "
            "osfn_dist.actor.create_curvature_actor (osfn-dist train does) and check `ray list actors`"
        ) from exc


class ActorExchange:
    """``exchange(report) -> DirectionUpdate`` through the curvature actor.

    Never hangs: every wait is bounded by ``timeout_s``; a dead, restarting or silent actor
    raises :class:`CurvatureServiceUnavailable` saying which actor and what to do. Errors
    raised by the service (version or dimension mismatch) come through with their own type.
    ``submit``/``result`` split the round trip for :class:`~osfn_dist.dataflow.pipeline.PipelinedExchange`.
    """

    def __init__(self, actor, timeout_s: float = DEFAULT_TIMEOUT_S, name: str = "curvature actor", keep: int = 100_000):
        self.actor = actor
        self.timeout_s = float(timeout_s)
        self.name = name
        self.latencies = collections.deque(maxlen=keep)  # seconds, submit → result
        self.waits = collections.deque(maxlen=keep)  # seconds blocked in result()
        self.count = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def submit(self, report: Report):
        wire = report.to_wire()
        sent = wire_size(wire)
        try:
            ref = self.actor.exchange.remote(wire)
        except Exception as exc:  # handle of an actor that no longer exists
            raise CurvatureServiceUnavailable(f"cannot call the {self.name}: {exc}") from exc
        return ref, time.perf_counter(), sent, report.step

    def result(self, handle) -> DirectionUpdate:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        ref, t0, sent, step = handle
        t_wait = time.perf_counter()
        try:
            wire = ray.get(ref, timeout=self.timeout_s)
        except GetTimeoutError as exc:
            try:
                ray.cancel(ref)  # drop it if still queued; a running call cannot be interrupted
            except Exception:
                pass
            raise CurvatureServiceUnavailable(
                f"the {self.name} did not answer the report of step {step} within {self.timeout_s:g} s; "
                "it is overloaded, hung or unreachable (check `ray list actors` and its logs); raise "
                "actor_timeout_s if the service is just slow"
            ) from exc
        except RayActorError as exc:
            raise CurvatureServiceUnavailable(
                f"the {self.name} died or is restarting while answering step {step} "
                f"({type(exc).__name__}). Training must restart from the last checkpoint, which restores "
                "the actor's curvature state (Ray Train does this with FailureConfig(max_failures>0))"
            ) from exc
        except OSFNError:
            raise  # the service's own typed errors (version/dimension mismatch, not restored)
        now = time.perf_counter()
        self.latencies.append(now - t0)
        self.waits.append(now - t_wait)
        self.count += 1
        self.bytes_sent += sent
        self.bytes_received += wire_size(wire)
        return DirectionUpdate.from_wire(wire)

    def exchange(self, report: Report) -> DirectionUpdate:
        return self.result(self.submit(report))

    def stats(self) -> dict:
        """Round trips, bytes per step (to + from the actor) and latency percentiles (ms)."""
        n = max(self.count, 1)
        lat = sorted(self.latencies)
        waits = sorted(self.waits)

        def pct(xs, q):
            if not xs:
                return float("nan")
            return 1e3 * xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

        return {
            "exchanges": self.count,
            "bytes_sent_per_step": self.bytes_sent / n,
            "bytes_received_per_step": self.bytes_received / n,
            "bytes_per_step": (self.bytes_sent + self.bytes_received) / n,
            "round_trip_ms_median": 1e3 * statistics.median(lat) if lat else float("nan"),
            "round_trip_ms_p99": pct(lat, 0.99),
            "wait_ms_median": 1e3 * statistics.median(waits) if waits else float("nan"),
            "wait_ms_p99": pct(waits, 0.99),
        }


def curvature_exchange(actor, *, timeout_s: float = DEFAULT_TIMEOUT_S, namespace: str = DEFAULT_NAMESPACE, group=None):
    """The ``exchange=`` for OSFN inside *your own* Ray Train ``train_func``: rank 0 talks to
    the curvature actor (a handle, or the name it was created with), every rank gets the same
    update (``LeaderExchange`` over the Train worker group's process group)::

        def train_func(config):
            model = ray.train.torch.prepare_model(build_model())          # DDP
            opt = OSFN(model.parameters(), lr=3e-3, exchange=curvature_exchange(config["actor"]))
            ...                                                            # an ordinary loop

    With DDP the gradients OSFN sees are already averaged; pass ``gradient_sync=GradientSync()``
    instead of DDP to also give the service every worker's own projection (noise estimates)."""
    import torch.distributed as dist

    from ..dataflow.distributed import LeaderExchange

    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    inner = None
    if rank == 0:
        handle = get_curvature_actor(actor, namespace) if isinstance(actor, str) else actor
        inner = ActorExchange(handle, timeout_s=timeout_s)
    if not (dist.is_available() and dist.is_initialized()):
        return inner
    return LeaderExchange(inner, group=group)
