"""gRPC credentials, channel/server options and server URL parsing.

Everything here exists so the server and the client daemons cannot drift apart:
both get their message limits and keepalive from fl_core.constants, and the
URL parser refuses every plaintext form, so no configuration typo can turn
mutual TLS off.
"""

from __future__ import annotations

import ipaddress
import os
import re

import grpc

from fl_core.constants import (
    DEFAULT_URL_PORT,
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    MAX_MESSAGE_BYTES,
    MIN_PING_INTERVAL_MS,
    TLS_FRAME_BYTES,
)

__all__ = [
    "SERVER_OPTIONS",
    "PemError",
    "channel_credentials",
    "channel_options",
    "load_pem",
    "parse_server_url",
    "server_credentials",
    "target",
]

ChannelOption = tuple[str, int | str]

# The server pings idle clients too, accepts client pings as often as every
# MIN_PING_INTERVAL_MS even with no call open, and never counts "strikes" against a
# client for pinging: together these keep hours-idle task streams alive instead of
# ending them with GOAWAY "too_many_pings".
# BDP probing is off: on loopback or a fast LAN it grows each upload stream's HTTP/2
# window far beyond what the aggregator reads per chunk, so clients faster than the
# server park tens of MB per stream in gRPC's buffers (8 concurrent 100 MB uploads:
# server peak RSS 1.4-1.6 GB with it, ~1 GB without); throughput is unchanged, since
# the window still covers a whole 1 MiB chunk message.
# TLS frames of TLS_FRAME_BYTES: smaller buffers held by every idle connection, at no
# measured cost to transfer speed (see the constant).
SERVER_OPTIONS: list[ChannelOption] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.tsi.max_frame_size", TLS_FRAME_BYTES),
]


def channel_options(server_name_override: str | None = None) -> list[ChannelOption]:
    """Client channel options; `server_name_override` checks the server certificate
    against that name instead of the dialled host (e.g. dialling 127.0.0.1)."""
    options: list[ChannelOption] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keep pinging however long the link carries no data (default stops after 2).
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server_name_override:
        options.append(("grpc.ssl_target_name_override", server_name_override))
    return options


def server_credentials(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> grpc.ServerCredentials:
    """Server TLS that refuses any client without a certificate signed by `ca_pem`."""
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def channel_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ChannelCredentials:
    """Client TLS that trusts only the private CA and presents the hospital's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


# --------------------------------------------------------------------------- URLs

_ACCEPTED = (
    "accepted forms: host:port, [ipv6]:port, https://host[:port][/], grpcs://host[:port][/] "
    f"(port {DEFAULT_URL_PORT} when a URL has none); the connection is always TLS"
)
_TLS_SCHEMES = ("https", "grpcs")
_PLAIN_SCHEMES = ("http", "grpc", "ws", "tcp", "dns", "unix")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def _bad(url: str, why: str) -> ValueError:
    return ValueError(f"invalid server URL {url!r}: {why}; {_ACCEPTED}")


def _check_host(url: str, host: str) -> str:
    if not host:
        raise _bad(url, "no host")
    try:
        ipaddress.IPv4Address(host)
        return host
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise _bad(url, f"{host!r} is not a host name or IPv4 address")
    return host


def _split_host_port(url: str, hostport: str, default_port: int | None) -> tuple[str, int]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise _bad(url, "unclosed '[' around an IPv6 address")
        host, rest = hostport[1:close], hostport[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(url, f"{host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise _bad(url, f"unexpected {rest!r} after the IPv6 address")
        port_text: str | None = rest[1:] if rest else None
    else:
        if hostport.count(":") > 1:
            raise _bad(url, "an IPv6 address must be in brackets, e.g. [::1]:5000")
        host, sep, port_text_raw = hostport.partition(":")
        port_text = port_text_raw if sep else None
        host = _check_host(url, host)
    if port_text is None:
        if default_port is None:
            raise _bad(url, "no port")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _bad(url, f"port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def parse_server_url(url: str) -> tuple[str, int]:
    """(host, port) of the server, from the forms an operator is likely to type.

    IPv6 hosts come back without brackets; use `target()` to dial them.
    """
    text = url.strip()
    if "://" in text:
        scheme, _, rest = text.partition("://")
        scheme = scheme.lower()
        if scheme in _PLAIN_SCHEMES:
            raise _bad(url, f"{scheme}:// is plaintext and the server only speaks TLS")
        if scheme not in _TLS_SCHEMES:
            raise _bad(url, f"unknown scheme {scheme}://")
        if rest.endswith("/"):
            rest = rest[:-1]
        for char, part in (("/", "path"), ("?", "query"), ("#", "fragment"), ("@", "user")):
            if char in rest:
                raise _bad(url, f"a server URL takes no {part}")
        return _split_host_port(url, rest, DEFAULT_URL_PORT)
    if not text or any(c in text for c in "/?#@ "):
        raise _bad(url, "not host:port")
    return _split_host_port(url, text, None)


def target(host: str, port: int) -> str:
    """The gRPC dial target for host and port (IPv6 in brackets)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


# --------------------------------------------------------------------------- files


class PemError(ValueError):
    """A certificate or key file is missing, unreadable, or not PEM."""


def load_pem(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a PEM file, or an error that names the file and what is wrong."""
    where = f"PEM file {os.fspath(path)!r}"
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise PemError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise PemError(f"{where} is a directory") from None
    except PermissionError:
        raise PemError(f"{where} is not readable (permission denied)") from None
    except OSError as exc:
        raise PemError(f"{where} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN " not in data or b"-----END " not in data:
        raise PemError(f"{where} holds no PEM block (expected '-----BEGIN ...')")
    return data
