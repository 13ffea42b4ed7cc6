from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShareKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_KIND_UNSPECIFIED: _ClassVar[ShareKind]
    SEED: _ClassVar[ShareKind]
    MASK_KEY: _ClassVar[ShareKind]
SHARE_KIND_UNSPECIFIED: ShareKind
SEED: ShareKind
MASK_KEY: ShareKind

class SecAggConfig(_message.Message):
    __slots__ = ("session_id", "participants", "threshold", "neighbours", "bits", "clip", "weight_divisor", "equal_weights", "vector_length", "l2_clip", "stage_timeout_s", "count_unclipped")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DIVISOR_FIELD_NUMBER: _ClassVar[int]
    EQUAL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    L2_CLIP_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    COUNT_UNCLIPPED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    participants: _containers.RepeatedScalarFieldContainer[str]
    threshold: int
    neighbours: int
    bits: int
    clip: float
    weight_divisor: float
    equal_weights: bool
    vector_length: int
    l2_clip: float
    stage_timeout_s: float
    count_unclipped: bool
    def __init__(self, session_id: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., threshold: _Optional[int] = ..., neighbours: _Optional[int] = ..., bits: _Optional[int] = ..., clip: _Optional[float] = ..., weight_divisor: _Optional[float] = ..., equal_weights: _Optional[bool] = ..., vector_length: _Optional[int] = ..., l2_clip: _Optional[float] = ..., stage_timeout_s: _Optional[float] = ..., count_unclipped: _Optional[bool] = ...) -> None: ...

class KeyAdvert(_message.Message):
    __slots__ = ("client_id", "mask_public_key", "share_public_key", "certificate_pem", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SHARE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    mask_public_key: bytes
    share_public_key: bytes
    certificate_pem: bytes
    signature: bytes
    def __init__(self, client_id: _Optional[str] = ..., mask_public_key: _Optional[bytes] = ..., share_public_key: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("task_id", "advert")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ADVERT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    advert: KeyAdvert
    def __init__(self, task_id: _Optional[str] = ..., advert: _Optional[_Union[KeyAdvert, _Mapping]] = ...) -> None: ...

class AdvertiseKeysReply(_message.Message):
    __slots__ = ("adverts", "crl_pem")
    ADVERTS_FIELD_NUMBER: _ClassVar[int]
    CRL_PEM_FIELD_NUMBER: _ClassVar[int]
    adverts: _containers.RepeatedCompositeFieldContainer[KeyAdvert]
    crl_pem: bytes
    def __init__(self, adverts: _Optional[_Iterable[_Union[KeyAdvert, _Mapping]]] = ..., crl_pem: _Optional[bytes] = ...) -> None: ...

class SharePlain(_message.Message):
    __slots__ = ("owner", "holder", "seed_share", "key_share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SEED_SHARE_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    holder: str
    seed_share: bytes
    key_share: bytes
    def __init__(self, owner: _Optional[str] = ..., holder: _Optional[str] = ..., seed_share: _Optional[bytes] = ..., key_share: _Optional[bytes] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("sender", "receiver", "box")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    sender: str
    receiver: str
    box: bytes
    def __init__(self, sender: _Optional[str] = ..., receiver: _Optional[str] = ..., box: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("task_id", "shares")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, task_id: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class ShareKeysReply(_message.Message):
    __slots__ = ("shares", "sharers")
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SHARERS_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    sharers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ..., sharers: _Optional[_Iterable[str]] = ...) -> None: ...

class UnmaskPoll(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "kind", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    kind: ShareKind
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., kind: _Optional[_Union[ShareKind, str]] = ..., share: _Optional[bytes] = ...) -> None: ...

class RevealSharesRequest(_message.Message):
    __slots__ = ("task_id", "shares")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, task_id: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class RevealSharesReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...
