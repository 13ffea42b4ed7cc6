"""The federated learning server: coordinator, aggregator, rounds, identity and trust.

gRPC core's own log level is set here, before any module of the package imports grpc
(GRPC_VERBOSITY is read once, when grpc is first imported): at its INFO default, core
writes one line per failed TLS handshake ("Handshake failed ... PEER_DID_NOT_RETURN_A_
CERTIFICATE", ~225 bytes), outside Python's logging and so outside the server's
per-peer refusal rate limit (fl_core/ratelimit.py), which let anyone who can reach the
port fill the server's log. ERROR keeps core's real errors. An operator who wants the
handshake lines (diagnosing a hospital's certificate) sets GRPC_VERBOSITY=INFO (or
DEBUG) in the daemon's environment; what the operator sets always wins.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
