"""The curvature service over gRPC: server, client exchange, CLI (serve | status).

- ``server.CurvatureServer``: serves ``dataflow.curvature.CurvatureService`` (one per job)
  with bearer-token auth, optional TLS, size limits, the standard health service and
  Prometheus metrics.
- ``client.GrpcExchange``: an OSFN exchange that talks to that server, with retries.
- ``v1/``: code generated from ``proto/`` by ``scripts/gen-proto.sh`` (never hand-edited).

Importing this package does not import grpc; its modules do.
"""
