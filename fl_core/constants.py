"""Every tunable of the wire and the daemons, in one place.

Kept together so an operator (or a benchmark) can see what the system assumes,
and so the server and client can never disagree about a limit.
"""

from typing import Final

PROTOCOL_VERSION: Final = "fl.v1"

# Tensor streams: plaintext bytes per sealed chunk. About 1 MiB keeps per-message
# overhead small while bounding what either side buffers for one message.
CHUNK_SIZE: Final = 1 << 20
GCM_TAG_BYTES: Final = 16
# A message carries one chunk (plus a small envelope) or a stream header whose
# manifest grows with the number of tensors; 8 MiB bounds both with room to spare.
MAX_MESSAGE_BYTES: Final = 8 << 20

# Keepalive that survives idle hours: the client pings every 5 minutes, the
# server allows pings that often even with no call active (avoids GOAWAY
# "too_many_pings", Flower issue #1800-style), and neither side kills an idle link.
KEEPALIVE_TIME_MS: Final = 300_000
KEEPALIVE_TIMEOUT_MS: Final = 20_000
MIN_PING_INTERVAL_MS: Final = 60_000

# Identity.
JWT_AUDIENCE: Final = "fl-server"
JWT_ISSUER: Final = "fl-server"
JWT_LIFETIME_S: Final = 600
JWT_LEEWAY_S: Final = 5
CA_VALIDITY_DAYS: Final = 3650
CERT_VALIDITY_DAYS: Final = 825
ROLE_CLIENT: Final = "client"
ROLE_ADMIN: Final = "admin"
ROLE_SERVER: Final = "server"

# Daemons.
DEFAULT_PORT: Final = 5000
DEFAULT_URL_PORT: Final = 443  # for https:// and grpcs:// URLs without a port
RECONNECT_BASE_S: Final = 0.5
RECONNECT_MAX_S: Final = 30.0
HEARTBEAT_INTERVAL_S: Final = 30.0
RPC_TIMEOUT_S: Final = 60.0
