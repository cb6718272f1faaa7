"""How a report reaches the curvature service and the update comes back.

An exchange is anything with ``exchange(report) -> DirectionUpdate``. In a single process
that is a direct call; the Ray actor and the gRPC client implement the same method, so the
optimizer never knows which transport it runs on.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from .messages import DirectionUpdate, Report
from .curvature import CurvatureService


@runtime_checkable
class Exchange(Protocol):
    def exchange(self, report: Report) -> DirectionUpdate: ...


class InProcessExchange:
    """The service lives in this process; its state travels in the optimizer's state_dict."""

    def __init__(self, service: CurvatureService):
        self.service = service

    def exchange(self, report: Report) -> DirectionUpdate:
        return self.service.exchange(report)

    def state_dict(self) -> dict:
        return self.service.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.service.load_state_dict(sd)

    def snapshot(self) -> dict:
        return self.service.snapshot()
