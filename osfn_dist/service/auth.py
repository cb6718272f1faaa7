"""Bearer-token authentication and the loopback rule.

- Every CurvatureService call must carry ``authorization: Bearer <token>``; the health
  service stays open so load balancers and Kubernetes probes need no secret.
- A server without a token only binds loopback addresses.
- Tokens come from a file (``--token-file``) or the environment variable ``OSFN_TOKEN``;
  surrounding whitespace is stripped on both sides (server and client) from either source.
- A refused call is answered before its request body is read (the refusal handler is a
  request-streaming one that never reads), so wrong-token traffic costs no buffers.
"""
from __future__ import annotations

import hmac
import ipaddress
import os

import grpc

from ..core.errors import ConfigError
from .health import HEALTH_METHOD_PREFIX

TOKEN_ENV = "OSFN_TOKEN"
AUTH_HEADER = "authorization"


def read_token(token: str | None = None, token_file: str | None = None, env: bool = True) -> str | None:
    """The first of: ``token``, the contents of ``token_file``, ``$OSFN_TOKEN``; else None."""
    if token and token.strip():
        return token.strip()
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {token_file!r}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"the token file {token_file!r} is empty; put the shared secret in it")
        return value
    if env:
        return (os.environ.get(TOKEN_ENV) or "").strip() or None
    return None


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host!r} without a token: anyone who can reach it could steer "
            f"training. Give --token-file FILE (or set {TOKEN_ENV}), or bind 127.0.0.1"
        )


def _deny(handler: grpc.RpcMethodHandler, detail: str) -> grpc.RpcMethodHandler:
    """A handler that refuses without reading the request: the synchronous server reads a
    unary request in full before calling its handler, a request-streaming handler only when
    it iterates (this one never does)."""
    def abort(request_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

    if handler is None:
        return None
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    return grpc.stream_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED (health is open)."""

    def __init__(self, token: str, on_denied=None):
        token = token.strip()
        if not token:
            raise ValueError("the bearer token is empty")
        self._expected = token.encode()
        self._on_denied = on_denied  # callback(method) for metrics

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(HEALTH_METHOD_PREFIX):
            return continuation(handler_call_details)
        value = ""
        for key, val in handler_call_details.invocation_metadata or ():
            if key == AUTH_HEADER:
                value = val if isinstance(val, str) else ""
                break
        scheme, _, presented = value.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self._expected):
            return continuation(handler_call_details)
        if self._on_denied is not None:
            self._on_denied(method)
        detail = (
            "missing bearer token: send the metadata 'authorization: Bearer <token>' (osfn-dist reads "
            f"it from --token-file or ${TOKEN_ENV})"
            if not value else "wrong bearer token: the server was started with a different token"
        )
        return _deny(continuation(handler_call_details), detail)
