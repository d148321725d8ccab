"""Real deployment over gRPC: `skyfed server` on one machine, `skyfed client` on each cloud.

The server runs the same `Engine` and strategies as the simulation through
`GrpcTransport`; clients run the same `FederatedClient`. Protocol: `skyfed.proto`
(package `skyfed.v1`); models and updates travel as skyfed wire bytes in chunks.
"""

PROTOCOL_VERSION = 2  # 2: identity in call metadata, checked before any message is read
DEFAULT_CHUNK_BYTES = 2**20  # 1 MiB: bench/transport.py measured it faster than 4 and 16 MiB, and it holds less in flight
