"""The event contract and the Redis keys of a run: the one place the operator and the SSE
server both import.

Owns: key names (every key of a run carries the Redis Cluster hash tag ``{<uid>}``), the
event envelope, the control-message format (stop), the run lease with its fencing number,
and the single Lua script through
which every event is appended (fence check, ``seq`` increment and ``XADD`` in one step, so
two operators can never interleave, duplicate or reorder a run's events).
Never: talks to Kubernetes, decides workflow logic, or writes a key of another run.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis import asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

EVENT_VERSION = 1
EventType = Literal["workflow", "token", "tool", "approval", "metrics", "fault", "end"]
WorkflowState = Literal[
    "pending",
    "planning",
    "executing",
    "awaiting_approval",
    "verifying",
    "resumed",
    "succeeded",
    "failed",
    "stopped",
]


# Redis could not serve a command, past the client's own retries, for a reason that passes:
# it is down or restarting, or (a Redis Cluster) a slot is moving to another node, its master
# is failing over, or the node asked is a replica now. Whoever gets one waits and tries again;
# it is never the run's fault (BusyLoadingError, Redis loading its AOF, is a ConnectionError).
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,  # CLUSTERDOWN, MASTERDOWN
    redis_errors.TryAgainError,
    redis_errors.AskError,  # MOVED too, once the client's redirections are used up
    redis_errors.RedisClusterException,  # a slot no node serves (yet)
    redis_errors.ReadOnlyError,  # a demoted master, until the client follows the move
)


def connect(url: str, *, max_connections: int = 64, cluster: bool = False) -> aioredis.Redis:
    """A client that reconnects by itself after a Redis restart and retries meanwhile.

    A blocking pool: hundreds of concurrent runs wait briefly for a connection instead of
    failing with MaxConnectionsError. ``cluster``: redis-py's cluster client (``url`` names
    any node; it finds the others and follows slots as they move, e.g. in a failover).
    """
    # Retries nest: a command retries, and each try's reconnect retries again, so the
    # worst case is about (retries + 1)^2 connection attempts. These give a Redis restart
    # some 7 s to come back; a longer outage reaches the caller, which waits and says why
    # (engine.execution) instead of hanging in a retry loop for a minute and more.
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=3)
    if cluster:
        client = RedisCluster.from_url(
            url,
            max_connections=max_connections,  # per node
            decode_responses=False,
            health_check_interval=10,
            socket_keepalive=True,
            socket_connect_timeout=5,
            retry=retry,
        )
        # Every key of a run carries its uid as a hash tag (one slot), so the commands the
        # engine and the SSE server send (scripts, WATCH/MULTI, XREAD of one stream) run
        # unchanged on the cluster client; tests/integration/test_redis_cluster.py proves
        # it on a real cluster, failover included.
        return cast(aioredis.Redis, client)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=30,
        decode_responses=False,
        health_check_interval=10,
        socket_keepalive=True,
        socket_connect_timeout=5,
        retry=retry,
        retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


async def check_mode(redis: aioredis.Redis, *, cluster: bool) -> str | None:
    """What is wrong with how we talk to this Redis, naming the setting to change; None
    when nothing is. A cluster spoken to as one server answers MOVED for most keys."""
    if cluster:
        return None  # the cluster client refuses a server that is not a cluster itself
    info = await redis.info("cluster")
    if int(info.get("cluster_enabled", 0)):
        return (
            "this Redis is a Redis Cluster: set AGENTRUN_REDIS_CLUSTER=true (chart: "
            "redis.cluster=true) so the operator and the SSE server use the cluster client"
        )
    return None


def _key(uid: str, suffix: str) -> str:
    return f"agentrun:{{{uid}}}:{suffix}"


def events_key(uid: str) -> str:
    return _key(uid, "events")


def control_key(uid: str) -> str:
    """Pub/sub channel for instant control messages (stop)."""
    return _key(uid, "control")


def owner_key(uid: str) -> str:
    return _key(uid, "owner")


def fence_key(uid: str) -> str:
    return _key(uid, "fence")


def seq_key(uid: str) -> str:
    return _key(uid, "seq")


def calls_key(uid: str) -> str:
    """Hash: call id -> JSON record of a tool call's intent and outcome (exactly-once)."""
    return _key(uid, "calls")


def meta_key(uid: str) -> str:
    """Hash of run bookkeeping that must survive restarts (time spent awaiting approval)."""
    return _key(uid, "meta")


# The work queue of the controller and its workers: Redis Streams with one consumer group
# each, sharded by hash tag (agentrun:work:{0} … {7}) on a Redis Cluster so that the queue
# is not one hot slot; one shard on a single Redis. A run's entries always go to one shard.
WORK_GROUP = "workers"
WORK_SHARDS_ON_CLUSTER = 8


def work_key(shard: int) -> str:
    return f"agentrun:work:{{{shard}}}"


WORK_KEY = work_key(0)


def work_shard(uid: str, shards: int) -> int:
    return zlib.crc32(uid.encode()) % shards if shards > 1 else 0


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis glob pattern (only * ? [ ] and \\ are special;
    braces are literal)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def run_keys_pattern(uid: str) -> str:
    return f"agentrun:{{{glob_escape(uid)}}}:*"


CONTROL_PATTERN = "agentrun:{*}:control"
EVENTS_PATTERN = "agentrun:{*}:events"


def _uid_of(key: str, suffix: str) -> str | None:
    prefix, suffix = "agentrun:{", "}:" + suffix
    if key.startswith(prefix) and key.endswith(suffix):
        return key[len(prefix) : -len(suffix)]
    return None


def uid_from_control_channel(channel: str) -> str | None:
    return _uid_of(channel, "control")


def uid_from_events_key(key: bytes | str) -> str | None:
    return _uid_of(key.decode() if isinstance(key, bytes) else key, "events")


# -- the control channel: stop, the instant way ------------------------------------------
# Stop travels two ways at once: spec.stop on the AgentRun (durable) and this message on the
# run's control channel (instant). Its format lives here only: the SSE server publishes it
# (after its spec.stop patch), the operator publishes it for a run another operator holds,
# and the operator's control listener parses it.


@dataclass(frozen=True)
class Control:
    """A control message for one run: ``action`` (only "stop" today) requested ``by``."""

    uid: str
    action: Literal["stop"]
    by: str


def stop_message(by: str) -> str:
    return json.dumps({"action": "stop", "by": by})


async def publish_stop(redis: aioredis.Redis, uid: str, *, by: str) -> int:
    """Tell whichever operator executes the run to stop it now; how many listened."""
    return int(await redis.publish(control_key(uid), stop_message(by)))


def parse_control(channel: bytes | str, data: Any) -> Control | None:
    """The control message received on ``channel``, or None when it is not one (a foreign
    channel, malformed JSON, an unknown action): such a message is ignored, never fatal."""
    uid = uid_from_control_channel(_text(channel))
    try:
        message = json.loads(data)
    except (ValueError, TypeError):
        return None
    if not uid or not isinstance(message, dict) or message.get("action") != "stop":
        return None
    return Control(uid=uid, action="stop", by=str(message.get("by") or ""))


def stream_path(namespace: str, name: str) -> str:
    return f"/api/v1/runs/{namespace}/{name}/events"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Fenced(RuntimeError):
    """This process no longer owns the run: another operator took it over."""


# KEYS: owner, seq, events, calls. ARGV: owner token, maxlen, JSON before seq, JSON after
# seq, and optionally a call id and its record (stored in the same step as the event).
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED run owned by another operator')
end
if ARGV[5] then redis.call('HSET', KEYS[4], ARGV[5], ARGV[6]) end
local seq = redis.call('INCR', KEYS[2])
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'data',
                      ARGV[3] .. seq .. ARGV[4])
return {id, seq}
"""

# KEYS: owner, calls. ARGV: owner token, call id, record JSON.
_RECORD_CALL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED run owned by another operator')
end
return redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
"""

# KEYS: owner, fence. ARGV: operator id, ttl ms. Takes a free lease, or our own one back
# after a restart of this same operator (same id), always with a new fencing number.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. '|' then
  return false
end
local fence = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. '|' .. fence
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""

# KEYS: owner. ARGV: token, ttl ms (0 = release).
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) == 0 then redis.call('DEL', KEYS[1]) else
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


@dataclass
class Lease:
    """Ownership of one run by one operator process, with a fencing token."""

    redis: aioredis.Redis
    uid: str
    token: str
    ttl_ms: int
    # Until when (this process's monotonic clock) the lease surely holds: the TTL counted
    # from before the request that set it, so never later than Redis's own expiry.
    valid_until: float = 0.0

    @classmethod
    async def acquire(
        cls, redis: aioredis.Redis, *, uid: str, operator_id: str, ttl_seconds: float
    ) -> Lease | None:
        ttl_ms = int(ttl_seconds * 1000)
        asked = time.monotonic()
        token = await redis.eval(_ACQUIRE, 2, owner_key(uid), fence_key(uid), operator_id, ttl_ms)
        if not token:
            return None
        return cls(redis, uid, _text(token), ttl_ms, asked + ttl_ms / 1000)

    async def renew(self) -> bool:
        asked = time.monotonic()
        ok = await self.redis.eval(_RENEW, 1, owner_key(self.uid), self.token, self.ttl_ms)
        if ok:
            self.valid_until = asked + self.ttl_ms / 1000
        return bool(ok)

    def held(self) -> bool:
        """Still surely this process's: false once a renewal is overdue (a pause, a partition),
        when another process may have taken the run over."""
        return time.monotonic() < self.valid_until

    async def release(self) -> None:
        await self.redis.eval(_RENEW, 1, owner_key(self.uid), self.token, 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class EventWriter:
    """Appends a run's events through the fenced Lua script; one per run and owner."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        uid: str,
        run: str,
        lease: Lease,
        maxlen: int,
    ) -> None:
        self._redis = redis
        self._uid = uid
        self._run = run
        self._lease = lease
        self._maxlen = maxlen
        self._script = redis.register_script(_APPEND)
        self._record = redis.register_script(_RECORD_CALL)
        self.last_id: str | None = None
        self.last_seq = 0

    async def append(
        self, type: EventType, data: Mapping[str, Any], *, call: tuple[str, str] | None = None
    ) -> str:
        """Append one event; with ``call`` (call id, record JSON), store that tool call's
        record in the same atomic step, so a crash can never leave an outcome reported but
        not recorded (it would be reported again on resume) or recorded but not reported."""
        ts = now_rfc3339()
        # The envelope is split around seq, which only the script knows.
        head = (
            f'{{"v":{EVENT_VERSION},"run":{json.dumps(self._run)},'
            f'"uid":{json.dumps(self._uid)},"seq":'
        )
        tail = (
            f',"type":{json.dumps(type)},"ts":{json.dumps(ts)},'
            f'"data":{json.dumps(data, separators=(",", ":"), default=str)}}}'
        )
        try:
            result = await self._script(
                keys=[
                    owner_key(self._uid),
                    seq_key(self._uid),
                    events_key(self._uid),
                    calls_key(self._uid),
                ],
                args=[self._lease.token, self._maxlen, head, tail, *(call or ())],
            )
        except aioredis.ResponseError as e:
            if "FENCED" in str(e):
                raise Fenced(f"run {self._run}: lease lost, another operator owns it") from e
            raise
        event_id, seq = cast(list[Any], result)
        self.last_id = _text(event_id)
        self.last_seq = int(seq)
        return self.last_id

    async def record_call(self, call_id: str, record: str) -> None:
        """Store a tool call's intent or outcome, fenced like every event."""
        try:
            await self._record(
                keys=[owner_key(self._uid), calls_key(self._uid)],
                args=[self._lease.token, call_id, record],
            )
        except aioredis.ResponseError as e:
            if "FENCED" in str(e):
                raise Fenced(f"run {self._run}: lease lost, another operator owns it") from e
            raise


def decode(event_id: bytes | str, fields: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    """One stream entry as the event dict, with its stream id under ``id``."""
    raw = fields.get(b"data", fields.get("data"))
    event: dict[str, Any] = json.loads(raw if raw is not None else "{}")
    event["id"] = _text(event_id)
    return event


def decode_entries(entries: object) -> list[dict[str, Any]]:
    """Entries as XRANGE / XREVRANGE return them, decoded (redis-py types those loosely)."""
    typed = cast(list[tuple[bytes | str, Mapping[bytes | str, bytes | str]]], entries or [])
    return [decode(event_id, fields) for event_id, fields in typed]


async def delete_run_keys(redis: aioredis.Redis, uid: str) -> int:
    """Delete every key of one run (events, lease, calls, checkpoints). Returns the count."""
    deleted = 0
    batch: list[Any] = []
    async for key in redis.scan_iter(match=run_keys_pattern(uid), count=500):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await redis.unlink(*batch)
            batch = []
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted
