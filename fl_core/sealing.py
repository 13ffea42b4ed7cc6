"""Chunk sealing on top of mTLS: X25519 + HKDF keys, AES-256-GCM STREAM construction.

TLS already protects each connection; sealing protects the *stream*. A chunk is
bound (by its nonce and associated data) to its job, round, client, direction,
stream, position and to whether it is the last one, and to the manifest that
describes the stream. So a chunk altered, moved, replayed into another stream, or
a stream cut short or extended, fails to open, even across reconnects and resumed
transfers where TLS sessions differ. Keys come from an X25519 agreement made at
join and are derived afresh per round, direction and stream, so one leaked stream
key exposes one stream.

Nonce reuse is the one way to break GCM: a stream key must never seal two
different plaintexts at the same sequence. A resumed stream re-seals the same
bytes (harmless); new content must get a new stream id.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import DecodeError

from fl_core.constants import GCM_TAG_BYTES, PROTOCOL_VERSION
from fl_proto import tensors_pb2

__all__ = [
    "DIRECTIONS",
    "KEY_BYTES",
    "MAX_SEQUENCE",
    "SealError",
    "StreamContext",
    "StreamOpener",
    "StreamSealer",
    "UnreadableMessage",
    "WireChunk",
    "WireChunkMessage",
    "chunk_message_bytes",
    "generate_keypair",
    "manifest_digest",
    "parse_chunk_message",
    "serialize_stream_message",
    "session_secret",
    "small_update_parser",
    "stream_key",
    "stream_message_parser",
]

KEY_BYTES = 32
PUBLIC_KEY_BYTES = 32
DIGEST_BYTES = 32
DIRECTIONS = ("down", "up")
# The nonce carries the sequence in 7 bytes.
MAX_SEQUENCE = (1 << 56) - 1
_MAX_ROUND = (1 << 32) - 1  # rounds are uint32 on the wire

# Codes (they travel in ErrorDetail.code).
SEAL_INVALID = "SEAL_INVALID"
OUT_OF_ORDER = "OUT_OF_ORDER"
WRONG_STREAM = "WRONG_STREAM"
AFTER_FINAL = "AFTER_FINAL"
TRUNCATED = "TRUNCATED"
BAD_PUBLIC_KEY = "BAD_PUBLIC_KEY"
BAD_KEY = "BAD_KEY"
BAD_CONTEXT = "BAD_CONTEXT"

_SESSION_SALT = PROTOCOL_VERSION.encode() + b" session"
_STREAM_SALT = PROTOCOL_VERSION.encode() + b" stream"


class SealError(Exception):
    """Every sealing failure; `code` is machine-readable (see the module constants)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _lp(*fields: bytes) -> bytes:
    """Length-prefixed concatenation: no two field lists encode to the same bytes."""
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


@dataclass(frozen=True)
class StreamContext:
    """Everything a stream's chunks are bound to."""

    job_id: str
    round: int
    client_id: str
    direction: str  # "down" (server -> client) or "up"
    stream_id: str
    manifest_digest: bytes

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise SealError(BAD_CONTEXT, f"direction {self.direction!r} is not 'down' or 'up'")
        if not 0 <= self.round <= _MAX_ROUND:
            raise SealError(BAD_CONTEXT, f"round {self.round} outside 0..{_MAX_ROUND}")
        if not self.stream_id:
            raise SealError(BAD_CONTEXT, "stream_id is empty")
        if len(self.manifest_digest) != DIGEST_BYTES:
            raise SealError(
                BAD_CONTEXT,
                f"manifest_digest is {len(self.manifest_digest)} bytes, not {DIGEST_BYTES}",
            )

    def _key_info(self) -> bytes:
        # The digest is left out so a key can be derived before the manifest exists;
        # it is bound into every chunk's associated data instead.
        return _lp(
            PROTOCOL_VERSION.encode(),
            b"stream-key",
            self.job_id.encode(),
            _u64(self.round),
            self.client_id.encode(),
            self.direction.encode(),
            self.stream_id.encode(),
        )

    def _aad_prefix(self) -> bytes:
        return _lp(
            PROTOCOL_VERSION.encode(),
            self.job_id.encode(),
            _u64(self.round),
            self.client_id.encode(),
            self.direction.encode(),
            self.stream_id.encode(),
        )


def manifest_digest(manifest: tensors_pb2.TensorManifest) -> bytes:
    """SHA-256 of the manifest's deterministic serialisation, bound into every chunk."""
    return hashlib.sha256(manifest.SerializeToString(deterministic=True)).digest()


# --------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair, the public half as its 32 raw bytes."""
    private = X25519PrivateKey.generate()
    return private, _public_bytes(private)


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def session_secret(private_key: X25519PrivateKey, peer_public: bytes, session_id: str) -> bytes:
    """The 32-byte session secret both sides derive from X25519 + HKDF-SHA256.

    Both public keys (in a fixed order) and the session id go into HKDF's info, so
    the secret is tied to this exchange; a low-order peer key, which would force a
    known shared value, is refused.
    """
    if not isinstance(peer_public, bytes | bytearray) or len(peer_public) != PUBLIC_KEY_BYTES:
        size = len(peer_public) if isinstance(peer_public, bytes | bytearray) else "?"
        raise SealError(BAD_PUBLIC_KEY, f"peer public key is {size} bytes, not 32")
    peer = bytes(peer_public)
    if not any(peer):
        raise SealError(BAD_PUBLIC_KEY, "peer public key is all zero")
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError as exc:  # cryptography refuses an all-zero shared secret
        raise SealError(BAD_PUBLIC_KEY, f"peer public key is a low-order point: {exc}") from exc
    own = _public_bytes(private_key)
    low, high = sorted((own, peer))
    info = _lp(PROTOCOL_VERSION.encode(), b"session", session_id.encode(), low, high)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_SESSION_SALT, info=info).derive(
        shared
    )


def stream_key(secret: bytes, ctx: StreamContext) -> bytes:
    """The AES-256 key of one stream: fresh per job, round, client, direction and stream."""
    if len(secret) != KEY_BYTES:
        raise SealError(BAD_KEY, f"session secret is {len(secret)} bytes, not {KEY_BYTES}")
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_STREAM_SALT, info=ctx._key_info()
    ).derive(secret)


# --------------------------------------------------------------------------- STREAM


class _StreamCipher:
    """Shared by sealer and opener: the per-chunk nonce and associated data."""

    def __init__(self, key: bytes, ctx: StreamContext) -> None:
        if len(key) != KEY_BYTES:
            raise SealError(BAD_KEY, f"stream key is {len(key)} bytes, not {KEY_BYTES}")
        self._aead = AESGCM(key)
        self.key = key
        self.ctx = ctx
        self._aad_prefix = ctx._aad_prefix()
        self._digest_field = _lp(ctx.manifest_digest)

    @staticmethod
    def nonce(sequence: int, final: bool) -> bytes:
        return b"\0\0\0\0" + sequence.to_bytes(7, "big") + (b"\1" if final else b"\0")

    def aad(self, sequence: int, final: bool, trailer: bytes = b"") -> bytes:
        """Associated data of one chunk. A trailer (the tensor digests a final chunk may
        carry) is appended as one more field only when present, so a stream without
        one seals exactly as fl.v1 always did, and one cannot be added or stripped."""
        aad = self._aad_prefix + _lp(_u64(sequence), b"\1" if final else b"\0") + \
            self._digest_field
        if trailer:
            aad += _lp(b"tensor digests", trailer)
        return aad


class _StreamEnd:
    """One end of a sealed stream: its cipher, the next sequence, whether it ended.

    `start_sequence` lets a resumed transfer continue where the receiver stopped.
    """

    def __init__(self, key: bytes, ctx: StreamContext, start_sequence: int = 0) -> None:
        self._cipher = _StreamCipher(key, ctx)
        self._next = start_sequence
        self._done = False

    @property
    def next_sequence(self) -> int:
        return self._next

    @property
    def done(self) -> bool:
        """The final chunk has been sealed (or opened)."""
        return self._done


class StreamSealer(_StreamEnd):
    """Seals one stream's chunks, refusing anything that could reuse a nonce."""

    def seal(
        self,
        sequence: int,
        plaintext: bytes | bytearray | memoryview,
        final: bool,
        trailer: bytes = b"",
    ) -> tensors_pb2.SealedChunk:
        chunk = tensors_pb2.SealedChunk()
        self.seal_into(chunk, sequence, plaintext, final, trailer)
        return chunk

    def seal_into(
        self,
        chunk: tensors_pb2.SealedChunk,
        sequence: int,
        plaintext: bytes | bytearray | memoryview,
        final: bool,
        trailer: bytes = b"",
    ) -> None:
        """Seal into `chunk`, typically the `chunk` field of the stream message being
        built: a SealedChunk built apart and then put in a message is copied whole
        (a megabyte per chunk) by protobuf.

        `trailer` (final chunk only) travels as `tensor_digests` and is bound into the
        chunk's associated data.
        """
        ciphertext = self._encrypt(sequence, plaintext, final, trailer)
        chunk.stream_id = self._cipher.ctx.stream_id
        chunk.sequence = sequence
        chunk.final = final
        chunk.ciphertext = ciphertext
        if trailer:
            chunk.tensor_digests = trailer

    def seal_message(
        self,
        sequence: int,
        plaintext: bytes | bytearray | memoryview,
        final: bool,
        trailer: bytes = b"",
    ) -> bytes:
        """`seal_into` a stream message, returned serialised (`chunk_message_bytes`):
        for a stub or handler whose serializer passes bytes through; the ciphertext is
        copied once, into these bytes, instead of into and out of a message."""
        ciphertext = self._encrypt(sequence, plaintext, final, trailer)
        return chunk_message_bytes(self._cipher.ctx.stream_id, sequence, final, ciphertext,
                                   trailer)

    def _encrypt(
        self, sequence: int, plaintext: bytes | bytearray | memoryview, final: bool,
        trailer: bytes,
    ) -> bytes:
        if self._done:
            raise SealError(AFTER_FINAL, f"chunk {sequence} sealed after the final chunk")
        if sequence < self._next:
            raise SealError(
                OUT_OF_ORDER, f"chunk {sequence} sealed, sequences must increase from {self._next}"
            )
        if sequence > MAX_SEQUENCE:
            raise SealError(OUT_OF_ORDER, f"sequence {sequence} exceeds {MAX_SEQUENCE}")
        if trailer and not final:
            raise SealError(BAD_CONTEXT, f"chunk {sequence}: only the final chunk has a trailer")
        cipher = self._cipher
        ciphertext = cipher._aead.encrypt(
            cipher.nonce(sequence, final), plaintext, cipher.aad(sequence, final, trailer)
        )
        self._next = sequence + 1
        self._done = final
        return ciphertext


class StreamOpener(_StreamEnd):
    """Opens one stream's chunks in order; `finish()` proves the stream was not cut.

    A refused chunk leaves the opener unchanged, but the caller should abandon
    the stream on SEAL_INVALID: the bytes were not what the sender sealed.
    """

    def check(self, chunk: tensors_pb2.SealedChunk | WireChunk, size: int | None = None
              ) -> None:
        """Everything `open` refuses before decrypting: stream, order, length (`size`:
        the ciphertext's, when the caller holds it: each read of a bytes field of a
        message copies it)."""
        cipher = self._cipher
        if chunk.stream_id != cipher.ctx.stream_id:
            raise SealError(
                WRONG_STREAM,
                f"chunk of stream {chunk.stream_id!r} offered to stream {cipher.ctx.stream_id!r}",
            )
        if self._done:
            raise SealError(AFTER_FINAL, f"chunk {chunk.sequence} after the final chunk")
        if chunk.sequence != self._next:
            raise SealError(
                OUT_OF_ORDER, f"chunk {chunk.sequence} arrived, expected chunk {self._next}"
            )
        if (len(chunk.ciphertext) if size is None else size) < GCM_TAG_BYTES:
            raise SealError(SEAL_INVALID, f"chunk {chunk.sequence} is shorter than a GCM tag")

    def _refused(self, chunk: tensors_pb2.SealedChunk | WireChunk) -> SealError:
        return SealError(
            SEAL_INVALID,
            f"chunk {chunk.sequence} of stream {chunk.stream_id!r} failed authentication "
            "(altered, misplaced, or sealed under another key or context)",
        )

    def open(self, chunk: tensors_pb2.SealedChunk | WireChunk) -> bytes:
        ciphertext = chunk.ciphertext
        self.check(chunk, len(ciphertext))
        cipher = self._cipher
        try:
            plaintext = cipher._aead.decrypt(
                cipher.nonce(chunk.sequence, chunk.final),
                ciphertext,
                cipher.aad(chunk.sequence, chunk.final, chunk.tensor_digests),
            )
        except InvalidTag:
            raise self._refused(chunk) from None
        self._next += 1
        self._done = chunk.final
        return plaintext

    def open_into(
        self, chunk: tensors_pb2.SealedChunk | WireChunk, out: memoryview,
        ciphertext: bytes | memoryview | None = None,
    ) -> None:
        """`open`, decrypting straight into `out` (exactly the plaintext's length): the
        receiver's buffer, so no plaintext copy is made and then copied again.
        `ciphertext`: the chunk's, if the caller already read it out of the message.

        GCM writes the plaintext before it can check the tag, so when this raises,
        `out` holds unauthenticated bytes: the caller must treat them as never written
        (the stream assembler only counts a chunk once it opened).
        """
        data = memoryview(chunk.ciphertext if ciphertext is None else ciphertext)
        self.check(chunk, len(data))
        body = len(data) - GCM_TAG_BYTES
        if len(out) != body:
            raise SealError(BAD_CONTEXT, f"buffer of {len(out)} bytes for {body} of plaintext")
        cipher = self._cipher
        decryptor = Cipher(
            algorithms.AES(cipher.key),
            modes.GCM(cipher.nonce(chunk.sequence, chunk.final), bytes(data[body:])),
        ).decryptor()
        decryptor.authenticate_additional_data(
            cipher.aad(chunk.sequence, chunk.final, chunk.tensor_digests)
        )
        try:
            if body:
                decryptor.update_into(data[:body], out)
            decryptor.finalize()
        except InvalidTag:
            raise self._refused(chunk) from None
        self._next += 1
        self._done = chunk.final

    def finish(self) -> None:
        if not self._done:
            raise SealError(
                TRUNCATED, f"stream {self._cipher.ctx.stream_id!r} ended before its final chunk"
            )


# --------------------------------------------------------------------------- wire
# A sealed chunk crosses the wire as ModelStreamMessage / UpdateStreamMessage field 2
# (`chunk`, a SealedChunk). Built and read through protobuf, each megabyte of
# ciphertext was copied three more times per end (into the message, out of it as
# bytes, and by the serialisation or parse itself: ~0.1 ms per chunk, per end). The
# functions below write and read exactly those bytes directly (issue 16 item 1): a
# sender joins the framing to the ciphertext once, a receiver gets the ciphertext as
# a view of the message gRPC handed it. The bytes on the wire are unchanged.

_CHUNK_FIELD_KEY = b"\x12"  # field 2 (`chunk`), length-delimited
_U64 = (1 << 64) - 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """(value, next position); -1 as the position for anything protobuf might read
    differently from this reader (overlong, truncated, beyond 64 bits)."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value, pos) if value <= _U64 else (0, -1)
        shift += 7
    return 0, -1


def chunk_message_bytes(
    stream_id: str, sequence: int, final: bool, ciphertext: bytes, trailer: bytes = b""
) -> bytes:
    """The serialised stream message holding one sealed chunk, byte for byte what
    protobuf writes for it (fields in order, defaults left out)."""
    sid = stream_id.encode()
    head = b"\x0a" + _varint(len(sid)) + sid if sid else b""
    if sequence:
        head += b"\x10" + _varint(sequence)
    if final:
        head += b"\x18\x01"
    head += b"\x22" + _varint(len(ciphertext))
    tail = b"\x2a" + _varint(len(trailer)) + trailer if trailer else b""
    size = len(head) + len(ciphertext) + len(tail)
    return b"".join((_CHUNK_FIELD_KEY, _varint(size), head, ciphertext, tail))


class WireChunk:
    """A SealedChunk read off the wire; `ciphertext` is a view of the received
    message (what `StreamOpener` and `StreamAssembler.add_sealed` read)."""

    __slots__ = ("ciphertext", "final", "sequence", "stream_id", "tensor_digests")

    def __init__(self, stream_id: str, sequence: int, final: bool, ciphertext: memoryview,
                 tensor_digests: bytes) -> None:
        self.stream_id = stream_id
        self.sequence = sequence
        self.final = final
        self.ciphertext = ciphertext
        self.tensor_digests = tensor_digests


class WireChunkMessage:
    """A stream message that holds a chunk: the part of the protobuf message's
    interface the transfer handlers use."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: WireChunk) -> None:
        self.chunk = chunk

    def HasField(self, name: str) -> bool:  # noqa: N802 (protobuf's name)
        return name == "chunk"


def parse_chunk_message(data: bytes | memoryview) -> WireChunkMessage | None:
    """The chunk of a serialised stream message, without copying its ciphertext; None
    for anything else (a header, an empty message, a field repeated, unknown or
    malformed), which the caller hands to protobuf, so every message protobuf reads
    is read the same (same values, same errors)."""
    size = len(data)
    if size < 2 or data[0] != 0x12:
        return None
    length, pos = _read_varint(data, 1, size)
    if pos < 0 or pos + length != size:
        return None
    view = memoryview(data)
    stream_id, sequence, final = "", 0, False
    ciphertext, digests = view[0:0], b""
    seen = 0
    while pos < size:
        key, pos = _read_varint(data, pos, size)
        field = key >> 3
        if pos < 0 or not 1 <= field <= 5 or seen & (1 << field):
            return None
        seen |= 1 << field
        if field in (2, 3):
            if key & 7 != 0:
                return None
            value, pos = _read_varint(data, pos, size)
            if pos < 0:
                return None
            if field == 2:
                sequence = value
            else:
                final = value != 0
            continue
        if key & 7 != 2:
            return None
        length, pos = _read_varint(data, pos, size)
        if pos < 0 or pos + length > size:
            return None
        if field == 1:
            try:
                stream_id = str(data[pos:pos + length], "utf-8")
            except UnicodeDecodeError:
                return None
        elif field == 4:
            ciphertext = view[pos:pos + length]
        else:
            digests = bytes(data[pos:pos + length])
        pos += length
    return WireChunkMessage(WireChunk(stream_id, sequence, final, ciphertext, digests))


class UnreadableMessage:
    """What `small_update_parser` hands over for bytes protobuf cannot read: the
    handler, after authentication, refuses them INVALID_ARGUMENT, as the bridge
    refuses such a message in a stream (gRPC's own answer would be UNKNOWN)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error

    def HasField(self, name: str) -> bool:  # noqa: N802 (protobuf's name)
        return False


def small_update_parser(small_type: Any, stream_type: Any) -> Callable[[bytes], tuple[Any, ...]]:
    """Deserializer for a SmallUpdate (aggregator.proto): the stream messages it holds,
    as SubmitUpdate's handler reads them (the header's message, then the chunk's, read
    in place). Its usual bytes are a header message's followed by a chunk message's;
    anything else (fields out of order, repeated, unknown, one missing) is read by
    protobuf and handed over as the messages it holds, so a request is read the same
    either way and a missing part is the handler's to refuse."""
    from_string = small_type.FromString
    header_from_string = stream_type.FromString

    def parse(data: bytes) -> tuple[Any, ...]:
        try:
            size = len(data)
            if size >= 2 and data[0] == 0x0A:
                length, pos = _read_varint(data, 1, size)
                end = pos + length
                if pos >= 0 and end < size:
                    chunk = parse_chunk_message(memoryview(data)[end:])
                    if chunk is not None:
                        return header_from_string(data[:end]), chunk
            small = from_string(data)
        except DecodeError as exc:
            return (UnreadableMessage(str(exc)),)
        return tuple(stream_type(**{part: getattr(small, part)})
                     for part in ("header", "chunk") if small.HasField(part))

    return parse


def serialize_stream_message(message: bytes | Any) -> bytes:
    """Serializer for stream messages that may come already serialised (`seal_message`)."""
    if isinstance(message, bytes):
        return message
    return bytes(message.SerializeToString())


def stream_message_parser(message_type: Any) -> Callable[[bytes], Any]:
    """Deserializer for a stream message type: a chunk read in place
    (`parse_chunk_message`), anything else by protobuf."""
    from_string = message_type.FromString

    def parse(data: bytes) -> Any:
        chunk = parse_chunk_message(data)
        return chunk if chunk is not None else from_string(data)

    return parse
