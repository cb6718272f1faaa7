"""Workers → driver: log records, events and final statistics of a Ray run.

The run directory lives on the driver's machine; workers may run elsewhere. Workers push
small records to a ``RunLog`` actor (owned by the driver, ``num_cpus=0``); the driver polls
it to draw the progress bar and write ``metrics.jsonl``. The log outlives worker-group
restarts, so it also records them (``restored`` events) and keeps the latest per-worker
statistics.
"""
from __future__ import annotations

import threading
import time


class RunLog:
    """Plain class; made remote by :func:`start_run_log`."""

    def __init__(self):
        self.records: list[dict] = []
        self.events: list[dict] = []
        self.workers: dict[int, dict] = {}
        self.final: dict = {}
        self.step = 0

    def log(self, records: list[dict]) -> None:
        self.records.extend(records)
        for r in records:
            if "step" in r:
                self.step = int(r["step"])

    def event(self, event: dict) -> None:
        self.events.append(event)
        self.records.append({"event": event.get("event", "event"), **event})
        if "step" in event:
            self.step = int(event["step"])

    def worker_done(self, rank: int, stats: dict) -> None:
        self.workers[int(rank)] = stats

    def set_final(self, values: dict) -> None:
        self.final.update(values)

    def read(self, start: int) -> tuple[list[dict], int]:
        """Records from index ``start`` on, and the step reached."""
        return self.records[start:], self.step

    def summary(self) -> dict:
        return {
            "workers": [self.workers[r] for r in sorted(self.workers)],
            "events": list(self.events),
            "final": dict(self.final),
        }


def start_run_log():
    import ray

    return ray.remote(RunLog).options(num_cpus=0, max_restarts=0).remote()


class Poller:
    """Driver side: a daemon thread that copies new records into the run directory, moves
    the progress bar and feeds the metrics exporter while ``trainer.fit()`` blocks."""

    def __init__(self, runlog, run, bar=None, interval_s: float = 0.25):
        self.runlog, self.run, self.bar = runlog, run, bar
        self.interval_s = interval_s
        self.seen = 0
        self._timing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="osfn-progress", daemon=True)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # the log actor is gone at shutdown; the final poll reports errors
                pass

    def poll(self) -> None:
        import ray

        records, step = ray.get(self.runlog.read.remote(self.seen), timeout=30)
        self.seen += len(records)
        last_loss = None
        for r in records:
            self.run.log(r)
            if "loss" in r:
                last_loss = r["loss"]
        if self.bar is not None:
            if step and not self._timing:
                # the rate and ETA count from the first logged step: Ray's start-up is not training
                self._timing = True
                self.bar.start_t = self.bar.last_print_t = time.time()
                self.bar.initial = step
            if step != self.bar.n:  # also moves back after a restart from a checkpoint
                self.bar.n = step
                if last_loss is not None:
                    self.bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                self.bar.refresh()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()
