from fl_proto import secagg_pb2 as _secagg_pb2
from fl_proto import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TRAIN: _ClassVar[TaskKind]
    EVALUATE: _ClassVar[TaskKind]
    STOP: _ClassVar[TaskKind]
    HEARTBEAT: _ClassVar[TaskKind]

class UpdateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_KIND_UNSPECIFIED: _ClassVar[UpdateKind]
    WEIGHTS: _ClassVar[UpdateKind]
    DELTA: _ClassVar[UpdateKind]

class ReportStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPORT_STATUS_UNSPECIFIED: _ClassVar[ReportStatus]
    OK: _ClassVar[ReportStatus]
    REFUSED: _ClassVar[ReportStatus]
    FAILED: _ClassVar[ReportStatus]
TASK_KIND_UNSPECIFIED: TaskKind
TRAIN: TaskKind
EVALUATE: TaskKind
STOP: TaskKind
HEARTBEAT: TaskKind
UPDATE_KIND_UNSPECIFIED: UpdateKind
WEIGHTS: UpdateKind
DELTA: UpdateKind
REPORT_STATUS_UNSPECIFIED: ReportStatus
OK: ReportStatus
REFUSED: ReportStatus
FAILED: ReportStatus

class ServedStudy(_message.Message):
    __slots__ = ("model_type", "num_examples")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    num_examples: int
    def __init__(self, model_type: _Optional[str] = ..., num_examples: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("job_toml",)
    JOB_TOML_FIELD_NUMBER: _ClassVar[int]
    job_toml: str
    def __init__(self, job_toml: _Optional[str] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "model_type", "strategy", "state", "total_rounds", "completed_rounds", "created_unix_ms", "job_sha256", "model_sha256", "queue_position", "settings_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    JOB_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_type: str
    strategy: str
    state: str
    total_rounds: int
    completed_rounds: int
    created_unix_ms: int
    job_sha256: str
    model_sha256: str
    queue_position: int
    settings_json: str
    def __init__(self, job_id: _Optional[str] = ..., model_type: _Optional[str] = ..., strategy: _Optional[str] = ..., state: _Optional[str] = ..., total_rounds: _Optional[int] = ..., completed_rounds: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., job_sha256: _Optional[str] = ..., model_sha256: _Optional[str] = ..., queue_position: _Optional[int] = ..., settings_json: _Optional[str] = ...) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class ModelBytes(_message.Message):
    __slots__ = ("data", "offset", "total_bytes", "sha256", "file_sha256", "round")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_bytes: int
    sha256: str
    file_sha256: str
    round: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., file_sha256: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("x25519_public_key", "model_type", "num_examples", "client_version", "previous_session_id", "replace_session", "epsilon_budget", "studies", "digests")
    X25519_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACE_SESSION_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    x25519_public_key: bytes
    model_type: str
    num_examples: int
    client_version: str
    previous_session_id: str
    replace_session: bool
    epsilon_budget: float
    studies: _containers.RepeatedCompositeFieldContainer[ServedStudy]
    digests: _containers.RepeatedScalarFieldContainer[_tensors_pb2.Digest]
    def __init__(self, x25519_public_key: _Optional[bytes] = ..., model_type: _Optional[str] = ..., num_examples: _Optional[int] = ..., client_version: _Optional[str] = ..., previous_session_id: _Optional[str] = ..., replace_session: _Optional[bool] = ..., epsilon_budget: _Optional[float] = ..., studies: _Optional[_Iterable[_Union[ServedStudy, _Mapping]]] = ..., digests: _Optional[_Iterable[_Union[_tensors_pb2.Digest, str]]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("session_id", "token", "token_expires_unix", "server_x25519_public_key", "job_id", "model_type", "client_id", "job_model_types", "digests")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    SERVER_X25519_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_MODEL_TYPES_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: str
    token_expires_unix: int
    server_x25519_public_key: bytes
    job_id: str
    model_type: str
    client_id: str
    job_model_types: _containers.RepeatedScalarFieldContainer[str]
    digests: _containers.RepeatedScalarFieldContainer[_tensors_pb2.Digest]
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[str] = ..., token_expires_unix: _Optional[int] = ..., server_x25519_public_key: _Optional[bytes] = ..., job_id: _Optional[str] = ..., model_type: _Optional[str] = ..., client_id: _Optional[str] = ..., job_model_types: _Optional[_Iterable[str]] = ..., digests: _Optional[_Iterable[_Union[_tensors_pb2.Digest, str]]] = ...) -> None: ...

class TaskStreamRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class PrivacyConfig(_message.Message):
    __slots__ = ("enabled", "noise_multiplier", "target_epsilon", "delta", "max_grad_norm", "epsilon_per_job", "total_rounds")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    EPSILON_PER_JOB_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    noise_multiplier: float
    target_epsilon: float
    delta: float
    max_grad_norm: float
    epsilon_per_job: float
    total_rounds: int
    def __init__(self, enabled: _Optional[bool] = ..., noise_multiplier: _Optional[float] = ..., target_epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., epsilon_per_job: _Optional[float] = ..., total_rounds: _Optional[int] = ...) -> None: ...

class TrainConfig(_message.Message):
    __slots__ = ("local_epochs", "batch_size", "learning_rate", "proximal_mu", "update_kind", "privacy", "seed", "strategy_settings", "strategy", "job_sha256", "job_rounds", "secure_aggregation")
    class StrategySettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    UPDATE_KIND_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    JOB_SHA256_FIELD_NUMBER: _ClassVar[int]
    JOB_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    batch_size: int
    learning_rate: float
    proximal_mu: float
    update_kind: UpdateKind
    privacy: PrivacyConfig
    seed: int
    strategy_settings: _containers.ScalarMap[str, float]
    strategy: str
    job_sha256: str
    job_rounds: int
    secure_aggregation: bool
    def __init__(self, local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., proximal_mu: _Optional[float] = ..., update_kind: _Optional[_Union[UpdateKind, str]] = ..., privacy: _Optional[_Union[PrivacyConfig, _Mapping]] = ..., seed: _Optional[int] = ..., strategy_settings: _Optional[_Mapping[str, float]] = ..., strategy: _Optional[str] = ..., job_sha256: _Optional[str] = ..., job_rounds: _Optional[int] = ..., secure_aggregation: _Optional[bool] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "job_id", "round", "model_type", "config", "deadline_unix_ms", "model_manifest", "secagg", "reason", "job_state", "strategy", "final_metrics", "model_stream_id", "model_chunks")
    class FinalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    FINAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    MODEL_STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: TaskKind
    job_id: str
    round: int
    model_type: str
    config: TrainConfig
    deadline_unix_ms: int
    model_manifest: _tensors_pb2.TensorManifest
    secagg: _secagg_pb2.SecAggConfig
    reason: str
    job_state: str
    strategy: str
    final_metrics: _containers.ScalarMap[str, float]
    model_stream_id: str
    model_chunks: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.SealedChunk]
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., model_type: _Optional[str] = ..., config: _Optional[_Union[TrainConfig, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., model_manifest: _Optional[_Union[_tensors_pb2.TensorManifest, _Mapping]] = ..., secagg: _Optional[_Union[_secagg_pb2.SecAggConfig, _Mapping]] = ..., reason: _Optional[str] = ..., job_state: _Optional[str] = ..., strategy: _Optional[str] = ..., final_metrics: _Optional[_Mapping[str, float]] = ..., model_stream_id: _Optional[str] = ..., model_chunks: _Optional[_Iterable[_Union[_tensors_pb2.SealedChunk, _Mapping]]] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("task_id", "job_id", "round", "kind", "status", "reason", "metrics", "num_examples", "epsilon_round", "epsilon_total", "delta", "dp_enabled", "train_seconds")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_ROUND_FIELD_NUMBER: _ClassVar[int]
    EPSILON_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DP_ENABLED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    job_id: str
    round: int
    kind: TaskKind
    status: ReportStatus
    reason: str
    metrics: _containers.ScalarMap[str, float]
    num_examples: int
    epsilon_round: float
    epsilon_total: float
    delta: float
    dp_enabled: bool
    train_seconds: float
    def __init__(self, task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., status: _Optional[_Union[ReportStatus, str]] = ..., reason: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_examples: _Optional[int] = ..., epsilon_round: _Optional[float] = ..., epsilon_total: _Optional[float] = ..., delta: _Optional[float] = ..., dp_enabled: _Optional[bool] = ..., train_seconds: _Optional[float] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("job_id", "rounds_after")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_AFTER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rounds_after: int
    def __init__(self, job_id: _Optional[str] = ..., rounds_after: _Optional[int] = ...) -> None: ...

class ClientStatus(_message.Message):
    __slots__ = ("client_id", "connected", "last_seen_unix_ms", "num_examples", "epsilon_total", "last_report_status", "last_report_reason", "epsilon_budget_left", "phase", "upload_chunks_done", "upload_chunks_total", "updates_accepted", "refusals", "epsilon_budget", "selected")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_REASON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_LEFT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UPDATES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    connected: bool
    last_seen_unix_ms: int
    num_examples: int
    epsilon_total: float
    last_report_status: str
    last_report_reason: str
    epsilon_budget_left: float
    phase: str
    upload_chunks_done: int
    upload_chunks_total: int
    updates_accepted: int
    refusals: int
    epsilon_budget: float
    selected: bool
    def __init__(self, client_id: _Optional[str] = ..., connected: _Optional[bool] = ..., last_seen_unix_ms: _Optional[int] = ..., num_examples: _Optional[int] = ..., epsilon_total: _Optional[float] = ..., last_report_status: _Optional[str] = ..., last_report_reason: _Optional[str] = ..., epsilon_budget_left: _Optional[float] = ..., phase: _Optional[str] = ..., upload_chunks_done: _Optional[int] = ..., upload_chunks_total: _Optional[int] = ..., updates_accepted: _Optional[int] = ..., refusals: _Optional[int] = ..., epsilon_budget: _Optional[float] = ..., selected: _Optional[bool] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "state", "selected", "reported", "failed", "metrics", "seconds", "model_sha256", "wait_seconds", "client_epsilon", "secure", "secagg_dropped", "secagg_threshold")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ClientEpsilonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_EPSILON_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_DROPPED_FIELD_NUMBER: _ClassVar[int]
    SECAGG_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    selected: int
    reported: int
    failed: int
    metrics: _containers.ScalarMap[str, float]
    seconds: float
    model_sha256: str
    wait_seconds: float
    client_epsilon: _containers.ScalarMap[str, float]
    secure: bool
    secagg_dropped: int
    secagg_threshold: int
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., selected: _Optional[int] = ..., reported: _Optional[int] = ..., failed: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., seconds: _Optional[float] = ..., model_sha256: _Optional[str] = ..., wait_seconds: _Optional[float] = ..., client_epsilon: _Optional[_Mapping[str, float]] = ..., secure: _Optional[bool] = ..., secagg_dropped: _Optional[int] = ..., secagg_threshold: _Optional[int] = ...) -> None: ...

class StatusEvent(_message.Message):
    __slots__ = ("unix_ms", "kind", "client_id", "message")
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    unix_ms: int
    kind: str
    client_id: str
    message: str
    def __init__(self, unix_ms: _Optional[int] = ..., kind: _Optional[str] = ..., client_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("job_id", "model_type", "strategy", "round", "total_rounds", "phase", "job_state", "clients", "rounds", "model_sha256", "events", "now_unix_ms", "phase_seconds", "queue")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NOW_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_type: str
    strategy: str
    round: int
    total_rounds: int
    phase: str
    job_state: str
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    model_sha256: str
    events: _containers.RepeatedCompositeFieldContainer[StatusEvent]
    now_unix_ms: int
    phase_seconds: float
    queue: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, job_id: _Optional[str] = ..., model_type: _Optional[str] = ..., strategy: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., phase: _Optional[str] = ..., job_state: _Optional[str] = ..., clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ..., model_sha256: _Optional[str] = ..., events: _Optional[_Iterable[_Union[StatusEvent, _Mapping]]] = ..., now_unix_ms: _Optional[int] = ..., phase_seconds: _Optional[float] = ..., queue: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...
