"""The curvature service inside a Ray actor (needs the ``ray`` extra only when started)."""
from .curvature_actor import (
    DEFAULT_NAMESPACE,
    ActorExchange,
    CurvatureActor,
    create_curvature_actor,
    curvature_exchange,
    get_curvature_actor,
    release_curvature_actor,
    wire_size,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "ActorExchange",
    "CurvatureActor",
    "create_curvature_actor",
    "curvature_exchange",
    "get_curvature_actor",
    "release_curvature_actor",
    "wire_size",
]
