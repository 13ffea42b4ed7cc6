from fl_proto import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FetchModelRequest(_message.Message):
    __slots__ = ("job_id", "round", "task_id", "resume_from")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    task_id: str
    resume_from: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., resume_from: _Optional[int] = ...) -> None: ...

class ModelStreamHeader(_message.Message):
    __slots__ = ("job_id", "round", "stream_id", "manifest")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    stream_id: str
    manifest: _tensors_pb2.TensorManifest
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., stream_id: _Optional[str] = ..., manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ...) -> None: ...

class ModelStreamMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ModelStreamHeader
    chunk: _tensors_pb2.SealedChunk
    def __init__(self, header: _Optional[_Union[ModelStreamHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensors_pb2.SealedChunk, _Mapping]] = ...) -> None: ...

class UpdateStreamHeader(_message.Message):
    __slots__ = ("job_id", "round", "task_id", "stream_id", "manifest", "num_examples", "resume_from", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    task_id: str
    stream_id: str
    manifest: _tensors_pb2.TensorManifest
    num_examples: int
    resume_from: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., task_id: _Optional[str] = ..., stream_id: _Optional[str] = ..., manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ..., num_examples: _Optional[int] = ..., resume_from: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class UpdateStreamMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateStreamHeader
    chunk: _tensors_pb2.SealedChunk
    def __init__(self, header: _Optional[_Union[UpdateStreamHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensors_pb2.SealedChunk, _Mapping]] = ...) -> None: ...

class SmallUpdate(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateStreamHeader
    chunk: _tensors_pb2.SealedChunk
    def __init__(self, header: _Optional[_Union[UpdateStreamHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensors_pb2.SealedChunk, _Mapping]] = ...) -> None: ...

class UpdateReceipt(_message.Message):
    __slots__ = ("stream_id", "chunks_received", "bytes_received", "sha256")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    chunks_received: int
    bytes_received: int
    sha256: bytes
    def __init__(self, stream_id: _Optional[str] = ..., chunks_received: _Optional[int] = ..., bytes_received: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class UploadStatusReply(_message.Message):
    __slots__ = ("stream_id", "next_sequence", "complete")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    next_sequence: int
    complete: bool
    def __init__(self, stream_id: _Optional[str] = ..., next_sequence: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...
