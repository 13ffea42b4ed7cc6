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

# Every call bounded (issue 11). A stalled call holds a server worker thread, so the
# threads are the budget: streaming calls (uploads, downloads, task feeds, health
# Watch, reflection) may hold at most max_workers minus a reserve, and the reserve
# keeps Status, health Check, Join and Report answerable whatever the streams do.
CALL_RESERVE_WORKERS: Final = 8  # at most a quarter of --max_workers, at least 2
# Concurrent calls one identity (certificate CN) may hold, per kind of call.
CALLS_PER_IDENTITY: Final = {
    "upload": 2, "download": 2, "tasks": 2, "watch": 2, "reflection": 1,
    "stream": 2,  # any other streaming method
    "unary": 8,
}
# ... and all streaming calls of one identity together (an honest hospital holds its
# task feed plus one download or upload, two task feeds for a moment on reconnect).
STREAMS_PER_IDENTITY: Final = 4
# A client stream must send its first message (an update's header) this soon, and
# then never fall silent longer than the idle limit; a server stream whose message
# the client does not take within the send limit is ended too.
STREAM_HEADER_DEADLINE_S: Final = 10.0
STREAM_IDLE_S: Final = 120.0
STREAM_SEND_STALL_S: Final = 120.0
# gRPC refuses calls beyond max_workers x this (RESOURCE_EXHAUSTED to anyone, before
# any interceptor runs): room for bursts of quick calls to queue for a thread instead.
# (A per-connection HTTP/2 stream cap, grpc.max_concurrent_streams, was tried and
# removed: a long-running hospital's connection was refused streams after ~30 rounds.)
CONCURRENT_RPCS_PER_WORKER: Final = 8
# Refusal log lines: at most BURST per peer per INTERVAL (the rest counted).
REFUSAL_LOG_INTERVAL_S: Final = 60.0
REFUSAL_LOG_BURST: Final = 5
REFUSAL_LOG_MAX_PEERS: Final = 1024

# A round's update whose L2 norm is above this many times the median norm of the
# round's other updates spoils the attempt: it is retried without that client
# (server flag --update_norm_factor; 0 turns the bound off).
UPDATE_NORM_FACTOR: Final = 10.0

# What a hospital accepts and reports (fl_client/task_policy.py). Metrics leave the
# hospital rounded to METRIC_DECIMALS places; an EVALUATE task is answered at most
# EVAL_MAX_PER_JOB times per job and not at all on a test split smaller than
# EVAL_MIN_TEST_EXAMPLES (small splits make each patient's weight in a metric large).
METRIC_DECIMALS: Final = 3
EVAL_MAX_PER_JOB: Final = 1000
EVAL_MIN_TEST_EXAMPLES: Final = 20
MAX_LOCAL_EPOCHS: Final = 1000
MAX_LOCAL_BATCH_SIZE: Final = 1 << 20

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
# Observability (issue 14): the server's Prometheus endpoint (0 turns it off; the
# client's is off unless --metrics_port is given); dashboard's page and refresh.
SERVER_METRICS_PORT: Final = 9464
METRICS_HOST: Final = "127.0.0.1"
DASHBOARD_PORT: Final = 8080
DASHBOARD_REFRESH_S: Final = 1.0

# Operations (fl_core/tls_diagnosis.py, the doctors, fl_core/logs.py).
# A trust failure (unknown CA, wrong name, expired or revoked certificate) is tried this
# many times in a row (a server may be mid-way through a certificate rotation), then
# the client exits naming the file to fix; network outages keep the endless backoff.
TRUST_FAILURE_ATTEMPTS: Final = 3
TLS_PROBE_TIMEOUT_S: Final = 5.0
# The doctors warn when a certificate expires within this many days, and fail on a
# clock this far from the server's (JWT lifetimes and certificate dates assume agreement).
CERT_EXPIRY_WARN_DAYS: Final = 30
MAX_CLOCK_SKEW_S: Final = 60.0
# --log_file rotation defaults: 5 files of 20 MiB keep weeks of round logs in 100 MiB.
LOG_FILE_MAX_BYTES: Final = 20 << 20
LOG_FILE_BACKUPS: Final = 5

# Secure aggregation (SecAgg+, fl_core/secagg). Keystream is generated and added to
# the masked vector this many bytes at a time (memory beyond the vector: one chunk;
# small enough that the vector's window stays in cache across all of a hospital's masks).
SECAGG_MASK_CHUNK_BYTES: Final = 256 << 10
# Fixed point: each coordinate is clipped to [-clip, clip] and scaled so that a full
# weight maps to 2^(bits-1); the sum of weights is at most 1, so sums stay < 2^31.
SECAGG_DEFAULT_BITS: Final = 24
SECAGG_MIN_BITS: Final = 8
SECAGG_MAX_BITS: Final = 30
SECAGG_DEFAULT_CLIP: Final = 4.0
# Shares needed = floor(fraction x holders) + 1 (strictly more than half by default).
SECAGG_DEFAULT_THRESHOLD: Final = 0.5
# Up to this many selected hospitals every pair is masked (complete graph); above it,
# each hospital has k ~ SECAGG_DEGREE_FACTOR x log2(n) neighbours (Bell et al. 2020).
SECAGG_COMPLETE_GRAPH_MAX: Final = 24
SECAGG_DEGREE_FACTOR: Final = 6.0
# How long each key/share/unmask stage waits for the hospitals still missing.
SECAGG_STAGE_TIMEOUT_S: Final = 60.0

# One live session per identity: a fresh Join waits this long for a task stream whose
# connection died (a killed daemon restarted at once) before refusing ALREADY_EXISTS.
SESSION_TAKEOVER_GRACE_S: Final = 3.0
# A client refused because its identity is live elsewhere tries this many times
# (SESSION_CONFLICT_RETRY_S apart: a dead peer's connection may take a keepalive to
# notice) before it exits with the message.
SESSION_CONFLICT_ATTEMPTS: Final = 3
SESSION_CONFLICT_RETRY_S: Final = 5.0

# --- privacy accounting and the job's budget planner (issue 13) ---
# The PRV accountant's epsilon error: its figure is an upper bound at most this far
# above the true epsilon; a smaller error means a finer grid (cost ~ 1 / error).
PRV_EPS_ERROR: Final = 0.01
# Above this many grid points (x distinct mechanisms; ~2 s a million on a busy core)
# the ledger uses RDP instead of PRV: memory and time grow with it (FFTs over it).
# Only huge epsilons or very many distinct rounds need so many.
PRV_MAX_GRID_POINTS: Final = 5_000_000
# After each PRV epsilon the ledger runs this many tiny real and complex FFTs of distinct
# lengths: scipy.fft keeps the plans of its last 16 lengths (pocketfft, process-wide,
# with no call to clear them), each the size of its transform, and PRV's grids left a
# hospital daemon holding GBs of them. Four times the cache's 16 slots, ~1 ms.
PRV_FFT_PLANS_EVICTED: Final = 64
# The planner aims each hospital at [1 - tolerance, 1] x its epsilon per job.
PLANNER_TOLERANCE: Final = 0.02

# A job's default privacy: each hospital's epsilon for the whole job (delta from the
# task), planned by each hospital over the job's rounds. Above EPSILON_WARN_PER_JOB
# for one job (or as a hospital's whole budget) the daemons warn: little privacy is left.
DEFAULT_EPSILON_PER_HOSPITAL: Final = 3.0
EPSILON_WARN_PER_JOB: Final = 10.0

# A server run with --exit_when_done waits at most this long, after its job completed,
# for the participating hospitals to download the final model (fl_server/final_model.py).
FINAL_MODEL_GRACE_S: Final = 60.0

# A client kept running after its job ended asks the server for a new job this often
# (the server answers an ended job's task stream with its STOP at once).
JOB_IDLE_POLL_S: Final = 30.0

# --- transfer and round cost (issue 16) ---
# Session tokens whose signature the server has verified and remembers (per token and
# certificate), so a hospital's later calls in its session skip the EdDSA check.
VERIFIED_TOKEN_CACHE: Final = 4096
# Hashing threads per process at most (fewer on fewer cores; hashlib releases the GIL):
# a sender hashes tensors in parallel, receivers hash multi-chunk streams off the
# thread that moves the bytes.
HASH_THREADS: Final = 4
# Below this many bytes a model's tensors are hashed on the caller's thread (handing
# work to threads costs more than it saves); from it, the server also takes a new
# model's record hash (SHA-256) on a thread of its own beside the manifest's digests.
PARALLEL_HASH_MIN_BYTES: Final = 8 << 20
# Streams of at least this many chunks are hashed off the receiving thread.
ASYNC_HASH_MIN_CHUNKS: Final = 4
# A received stream of at most this many bytes goes into a heap buffer (a bytearray);
# larger ones into a fresh anonymous mapping, populated at once. For a small model's
# stream the mapping cost a mmap and a munmap call and its page faults: 164 us per
# 400 KB stream against 6 us from the heap here (issue 16 item 2).
HEAP_STREAM_MAX_BYTES: Final = 1 << 20
# The last freed of those mappings is kept, resident, for the next stream of its size
# (fl_core/receive_buffers.py: a hospital's next download), up to this size: one model's
# worth of memory held between rounds, against faulting a whole model in every round.
RECEIVE_SPARE_MAX_BYTES: Final = 1 << 30
# A spooled upload decrypts into this many chunk-sized buffers in turn; each is free
# again once its chunk is hashed (bounds the memory hashing may lag behind by).
SPOOL_SCRATCH_CHUNKS: Final = 4
# A spool file whose upload is done is kept, with its blocks and page cache, for the
# next upload (fl_server/spool_pool.py), up to these many files and bytes in all; past
# them it is deleted as before. A new spool's page cache is fresh memory, and on a
# virtual machine whose host takes freed guest memory back (these Firecracker guests)
# writing it cost up to ~5x the copy itself while the guest was fresh from boot
# (issue 16 items 1 and 3).
SPOOL_POOL_MAX_FILES: Final = 64
SPOOL_POOL_MAX_BYTES: Final = 2 << 30
# ... and only while the spool's file system keeps this much free besides room for two
# more files of its size: a kept file must never be why a checkpoint cannot be written.
SPOOL_POOL_MIN_FREE_BYTES: Final = 1 << 30

# --- jobs at runtime (issue 15) ---
# `fl-admin download` receives the final model in messages of this size (mTLS).
DOWNLOAD_CHUNK_BYTES: Final = 1 << 20

# --- secure aggregation performance (issue 12) ---
# Once the revealed shares hold t of every secret the unmasking needs, the server waits
# at most this long for survivors that have not revealed yet (not the stage timeout).
SECAGG_UNMASK_GRACE_S: Final = 2.0

# STOP tasks a hospital's registry entry keeps until a task stream has sent them (one
# per job, newest kept): a STOP is never replaced unseen by the next job's first task.
MAX_UNSENT_STOPS: Final = 4

# --- memory (issue 16 item 3, issue 17) ---
# glibc's mmap threshold, fixed (fl_core/allocator.py). The server: allocations from
# 4 MiB (a model's tensors, FedAvg's running sums) get their own mappings, given back
# when freed, while 1 MiB chunk buffers stay on the heap (a 512 KiB threshold cost +75%
# server CPU for 20 MB less). The simulation's driver: glibc's own initial 128 KiB,
# kept fixed, so each update-sized buffer from Ray is unmapped when freed.
SERVER_MMAP_THRESHOLD_BYTES: Final = 4 << 20
# ... and its trim threshold, which a fixed mmap threshold leaves at 128 KiB: every
# 0.4-1 MiB message or chunk buffer freed at the top of a worker's heap was handed back
# and faulted in again by the next (100k x 10: ~100,000 minor faults in 5 s of rounds,
# 10x fewer at 8 MiB). The heaps are still given back between rounds (malloc_trim).
SERVER_TRIM_THRESHOLD_BYTES: Final = 8 << 20
# The hospital's daemon (fl_client/connection.py): glibc's dynamic thresholds left the
# heaps handing back and faulting in again the buffers that every transfer churns
# (gRPC's read slices, 1 MiB messages, sealed chunks): 34,000-40,000 minor faults per
# no-op client per 100 MB round before, 21,000-25,000 with these (the download's own
# buffer is ~25,600 of those: a model, once).
# Model-sized tensors from 4 MiB are still mapped apart and given back when freed.
CLIENT_MMAP_THRESHOLD_BYTES: Final = 4 << 20
CLIENT_TRIM_THRESHOLD_BYTES: Final = 64 << 20
SIM_MMAP_THRESHOLD_BYTES: Final = 128 << 10
# The largest single write to a file (checkpoints, spool files): longer writes cost a
# ballooned VM host faults (fl_core/file_writes.py says why and how much).
FILE_WRITE_PIECE_BYTES: Final = 1 << 20
# Elements of a new model's difference from the old taken at a time when the round
# measures the step it made (fl_server/rounds.py step_and_size): 1 MiB of float32,
# reused, instead of a fresh mapping per tensor faulted in and handed back.
NORM_CHUNK_ELEMS: Final = 1 << 18

# grpc.aio server (issue 16 item 4). An idle task stream holds no thread, so open
# calls are capped by max_workers x CONCURRENT_RPCS_PER_WORKER plus this many task
# streams (one per connected hospital; each costs a coroutine and its connection).
MAX_TASK_STREAMS: Final = 50_000
# How often the server looks at crl.pem for a change; a change wakes every task
# stream so a revoked hospital's open stream ends within about this long.
REVOCATION_POLL_S: Final = 1.0

# --- the small round's server CPU (issue 16 item 2) ---
# CPython's youngest-generation collection threshold for the daemons once started
# (default 700): one gRPC call allocates a few hundred container objects, so the
# default collects every call or two (fl_core/gc_policy.py).
GC_GEN0_THRESHOLD: Final = 20_000
# How often at most the round engine also collects the oldest generation, where a
# round's state lands once it has outlived a young collection (fl_core/gc_policy.py):
# what the rounds of this long leave in cycles is all the garbage a daemon holds.
GC_FULL_INTERVAL_S: Final = 30.0
# A global model of at most this many bytes travels sealed inside its TRAIN/EVALUATE
# task (fl_server/model_stream.py): one FetchModel call less per hospital a round. One
# transfer chunk: a task message stays far below MAX_MESSAGE_BYTES (8 MiB).
INLINE_MODEL_MAX_BYTES: Final = 1 << 20
# After each round of a model of at least this many bytes, the server hands glibc's
# free heap pages back to the system (malloc_trim, ~3 ms at 100 MB): the round's
# 1 MiB chunk buffers, freed across many threads' heaps, otherwise stay resident
# (~30 MB at 100 MB x 4, issue 16 item 3). Below it a trim after every round would
# cost more than it gives back; the heaps are trimmed with the full collection instead
# (GC_FULL_INTERVAL_S, fl_server/rounds.py).
TRIM_HEAP_MIN_MODEL_BYTES: Final = 16 << 20

# --- issue 16 item 4 (memory helper) ---
# Peer certificates the server remembers parsed (fl_server/auth.py), keyed by their
# SHA-256: one per connected hospital, so above the number connected (5,000 in the
# issue) lest every call of a hospital pushed out re-parse its certificate.
PEER_CACHE: Final = 16_384
# --- issue 16 item 3 (lead): the global model read from its checkpoint ---
# A global model of at least this many bytes is served from its checkpoint file once
# written (fl_server/model_pages.py): page cache the kernel can reclaim, each tensor's
# pages dropped once a reader has passed them, instead of a model of anonymous memory
# held next to FedAvg's running sums all round (issue 16 item 3).
MAPPED_MODEL_MIN_BYTES: Final = 16 << 20
# --- issue 16 item 4 (lead, 2026-12-03 session 2): TLS frame buffers per connection ---
# The server's TLS frame protector buffer (gRPC's grpc.tsi.max_frame_size; its default is
# 16 KiB). Every connected hospital holds these buffers while idle: 8 KiB saves ~4 KB of
# RSS per connection (101.5 -> 97.3 KB at 1,000 idle task streams), and sealed transfers
# of 256 MiB ran at the same speed either way (bench.transfer, BENCHMARKS.md).
TLS_FRAME_BYTES: Final = 8192
# A new stream for an upload that another stream still holds waits this long for it
# before it is refused BUSY. A hospital whose stream broke resumes on a new one, often
# before the server has seen the old one end (its read fails a moment later), and
# would otherwise be told BUSY by a stream that is already over; a truly concurrent
# second sender still gets BUSY, 2 s later.
UPLOAD_BUSY_WAIT_S: Final = 2.0
# A one-chunk upload (a small model's) of at most UPLOAD_MEMORY_MAX_BYTES is received
# into memory instead of a spool file (issue 16 item 2): a spool cost ~12 syscalls and
# the file system's work per upload, about a tenth of a small round's server CPU per
# hospital, and a one-chunk stream has no partial state to resume from. Uploads held in
# memory at once are bounded by UPLOAD_MEMORY_BUDGET_BYTES; past it, and for every
# larger or multi-chunk upload, the spool file as before.
UPLOAD_MEMORY_MAX_BYTES: Final = CHUNK_SIZE
UPLOAD_MEMORY_BUDGET_BYTES: Final = 64 << 20
# Such an upload is also handled on the server's event loop, with no worker thread,
# once its whole stream has been read (fl_server/serving.py): the hand-off to a worker
# and back was about a seventh of a small round's server CPU per hospital (issue 16
# item 2). The loop waits this long for the rest of a stream without holding a thread; a
# stream not complete by then goes to a worker, under the streams' usual limits.
LOOP_READ_WAIT_S: Final = 0.25
# Decoded round metrics the store keeps for Status, bounded by the memory they hold
# (store.held_size: five to seven times their JSON text). A round's metrics carry a
# summary per hospital, so an entry count (4,096 before) could hold ~1 GB with thousands
# of hospitals a round; 32 MiB keeps ~5,800 rounds of a 10-hospital federation and the
# latest 400-600 of a 100-hospital one (the rest are decoded again when asked).
METRICS_CACHE_BYTES: Final = 32 << 20

# --- where a hospital trains (fl-client --device, python -m fl_demo --device) ---
# auto: the CUDA GPU when torch sees one, else the CPU (fl_models/training.py).
TRAINING_DEVICES: Final = ("cpu", "cuda", "auto")
