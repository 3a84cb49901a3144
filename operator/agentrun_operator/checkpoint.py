"""LangGraph checkpoints in plain Redis (no modules): the operator's checkpointer.

Owns every checkpoint key of a run and their layout. All keys of one thread (thread id =
the AgentRun's uid) start with ``<prefix>:{<thread_id>}:``, so they share one Redis
Cluster hash slot with the run's event stream, and every multi-key write is one
MULTI/EXEC transaction: a process killed mid-write never leaves half a checkpoint.

    <root>:ns                  set: namespaces that have checkpoints
    <root>:keys                set: every idx/blobs/cp/w key below (what a delete removes)
    <root>:idx:<ns>            sorted set of checkpoint ids (all score 0: lexicographic, and
                               uuid6 ids sort by time)
    <root>:cp:<ns>:<id>        hash: the checkpoint without its values, metadata, parent
    <root>:blobs:<ns>          hash: channel values, one field per (channel, version)
    <root>:w:<ns>:<id>         hash: pending writes, one field per (task_id, idx)

Never touches a key outside its prefix, never needs RediSearch/RedisJSON, and never
decides anything about a run: it stores what LangGraph hands it. Async only: LangGraph's
async execution (``ainvoke``/``astream``/``aget_state``) calls only the ``a*`` methods.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from langchain_core import runnables
from langgraph.checkpoint import base
from langgraph.checkpoint.serde import base as serde_base
from redis import asyncio as aioredis
from redis import exceptions as redis_exceptions
from redis import typing as redis_typing

from agentrun_operator import events

DEFAULT_PREFIX: Final = "agentrun"

# Checkpoints read per round trip while listing.
_PAGE: Final = 50
# Keys deleted per UNLINK while removing a whole run.
_UNLINK_BATCH: Final = 500
# LangGraph's marker for a channel that has a version but no value.
_EMPTY: Final = "empty"

_ASYNC_ONLY = (
    "RedisCheckpointSaver is async-only: call {name} (LangGraph's ainvoke/astream/aget_state "
    "use it); the synchronous graph API is not supported."
)


def _check_no_braces(what: str, text: str) -> None:
    # A brace would move or split the Redis Cluster hash tag, scattering a thread's keys.
    if "{" in text or "}" in text:
        raise ValueError(f"{what} must not contain '{{' or '}}': {text!r}")


def thread_keys_pattern(thread_id: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """The SCAN/KEYS glob matching every key of a thread: its checkpoints, and any other key
    of the same run that shares the ``<prefix>:{<thread_id>}:`` root (events, lease)."""
    _check_no_braces("thread_id", thread_id)
    return f"{events.glob_escape(prefix)}:{{{events.glob_escape(thread_id)}}}:*"


async def delete_thread(
    redis: aioredis.Redis, thread_id: str, *, prefix: str = DEFAULT_PREFIX
) -> int:
    """Remove everything of a run: every key matching `thread_keys_pattern`, checkpoints
    and all other keys under the run's root. Returns how many keys were removed.

    For a deleted AgentRun. Not atomic (a SCAN walks the keyspace), but idempotent: run it
    again after a crash and it finishes the job. `RedisCheckpointSaver.adelete_thread`
    removes only the checkpoints, atomically.
    """
    removed = 0
    batch: list[bytes] = []
    pattern = thread_keys_pattern(thread_id, prefix=prefix)
    async for key in redis.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= _UNLINK_BATCH:
            removed += await redis.unlink(*batch)
            batch = []
    if batch:
        removed += await redis.unlink(*batch)
    return removed


@dataclass(frozen=True)
class _Keys:
    """Key names of one thread; `root` is ``<prefix>:{<thread_id>}``."""

    root: str

    @classmethod
    def of(cls, prefix: str, thread_id: str) -> _Keys:
        _check_no_braces("thread_id", thread_id)
        return cls(f"{prefix}:{{{thread_id}}}")

    @property
    def namespaces(self) -> str:
        return f"{self.root}:ns"

    @property
    def registry(self) -> str:
        return f"{self.root}:keys"

    def index(self, ns: str) -> str:
        return f"{self.root}:idx:{ns}"

    def blobs(self, ns: str) -> str:
        return f"{self.root}:blobs:{ns}"

    # Checkpoint ids are uuid6 strings (no ':'), so "<ns>:<id>" cannot be read two ways.
    def checkpoint(self, ns: str, checkpoint_id: str) -> str:
        return f"{self.root}:cp:{ns}:{checkpoint_id}"

    def writes(self, ns: str, checkpoint_id: str) -> str:
        return f"{self.root}:w:{ns}:{checkpoint_id}"


def _blob_field(channel: str, version: object) -> str:
    # JSON keeps 1, 1.0 and "1" apart, as LangGraph's own savers key blobs by the value.
    return json.dumps([channel, version])


def _pack(typed: tuple[str, bytes]) -> bytes:
    kind, data = typed
    return kind.encode() + b"\n" + data


def _unpack(raw: bytes | str) -> tuple[str, bytes]:
    kind, _, data = _bytes(raw).partition(b"\n")
    return kind.decode(), data


def _bytes(value: object) -> bytes:
    # redis-py types replies as bytes | str; with decode_responses=False they are bytes.
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")
    return value


def _text(value: object) -> str:
    return _bytes(value).decode()


def _multi(pipe: aioredis.client.Pipeline) -> None:
    """End the WATCH phase of a pipeline: commands from here on are queued for EXEC."""
    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves multi() unannotated


@dataclass(frozen=True)
class _Entry:
    """What pruning needs to know of a stored checkpoint, without deserializing it."""

    id: str
    parent: str | None
    versions: dict[str, object]
    run_id: str
    delta_channels: tuple[str, ...]

    @property
    def blob_fields(self) -> set[str]:
        return {_blob_field(ch, v) for ch, v in self.versions.items()}


# Chooses, for one namespace, the ids to drop from its entries (oldest first).
_Chooser = Callable[[_Keys, str, list[_Entry]], Awaitable[set[str]]]


class RedisCheckpointSaver(base.BaseCheckpointSaver[str]):
    """A LangGraph checkpointer on plain Redis (>= 6.2), through redis-py's asyncio client.

    The client must be created with ``decode_responses=False``: values are bytes.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        serde: serde_base.SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        # get_encoder: on one server and on a cluster client alike (redis-py leaves it untyped)
        if redis.get_encoder().decode_responses:  # type: ignore[no-untyped-call]
            raise ValueError("RedisCheckpointSaver needs a client with decode_responses=False")
        _check_no_braces("prefix", prefix)
        self.redis = redis
        self.prefix = prefix

    def _keys(self, thread_id: object) -> _Keys:
        return _Keys.of(self.prefix, str(thread_id))

    # -- writing ----------------------------------------------------------------------------

    async def aput(
        self,
        config: runnables.RunnableConfig,
        checkpoint: base.Checkpoint,
        metadata: base.CheckpointMetadata,
        new_versions: base.ChannelVersions,
    ) -> runnables.RunnableConfig:
        conf = config["configurable"]
        thread_id = str(conf["thread_id"])
        ns: str = conf.get("checkpoint_ns") or ""
        keys = self._keys(thread_id)
        values = checkpoint["channel_values"]
        rest = {k: v for k, v in checkpoint.items() if k != "channel_values"}
        # Only the channels that changed get a new blob; the others keep the blob of the
        # version this checkpoint still names (as InMemorySaver and PostgresSaver do).
        blobs: dict[redis_typing.FieldT, redis_typing.EncodableT] = {
            _blob_field(ch, version): _pack(
                self.serde.dumps_typed(values[ch]) if ch in values else (_EMPTY, b"")
            )
            for ch, version in new_versions.items()
        }
        full_metadata = base.get_checkpoint_metadata(config, metadata)
        cp_key = keys.checkpoint(ns, checkpoint["id"])
        fields: dict[redis_typing.FieldT, redis_typing.EncodableT] = {
            "checkpoint": _pack(self.serde.dumps_typed(rest)),
            "metadata": _pack(self.serde.dumps_typed(full_metadata)),
            "parent": conf.get("checkpoint_id") or "",
            "versions": json.dumps(checkpoint["channel_versions"]),
            "run_id": str(full_metadata.get("run_id") or ""),
            "delta": json.dumps(sorted(full_metadata.get("counters_since_delta_snapshot") or {})),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            if blobs:
                pipe.hset(keys.blobs(ns), mapping=blobs)
            pipe.hset(cp_key, mapping=fields)
            pipe.zadd(keys.index(ns), {checkpoint["id"]: 0})
            pipe.sadd(keys.namespaces, ns)
            pipe.sadd(keys.registry, keys.index(ns), keys.blobs(ns), cp_key)
            await pipe.execute()
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint["id"],
            }
        }

    async def aput_writes(
        self,
        config: runnables.RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        conf = config["configurable"]
        ns: str = conf.get("checkpoint_ns") or ""
        keys = self._keys(conf["thread_id"])
        w_key = keys.writes(ns, conf["checkpoint_id"])
        async with self.redis.pipeline(transaction=True) as pipe:
            for position, (channel, value) in enumerate(writes):
                idx = base.WRITES_IDX_MAP.get(channel, position)
                field = json.dumps([task_id, idx])
                header = json.dumps({"task_id": task_id, "channel": channel, "path": task_path})
                packed = header.encode() + b"\n" + _pack(self.serde.dumps_typed(value))
                # Special channels (error, interrupt, resume...) replace the earlier write;
                # a regular write is kept as first stored, so a retried task cannot
                # change what was already recorded.
                if idx < 0:
                    pipe.hset(w_key, field, packed)
                else:
                    pipe.hsetnx(w_key, field, packed)
            pipe.sadd(keys.registry, w_key)
            await pipe.execute()

    # -- reading ----------------------------------------------------------------------------

    async def aget_tuple(self, config: runnables.RunnableConfig) -> base.CheckpointTuple | None:
        conf = config["configurable"]
        thread_id = str(conf["thread_id"])
        ns: str = conf.get("checkpoint_ns") or ""
        keys = self._keys(thread_id)
        checkpoint_id = base.get_checkpoint_id(config)
        if not checkpoint_id:
            newest = await self.redis.zrevrangebylex(keys.index(ns), "+", "-", start=0, num=1)
            if not newest:
                return None
            checkpoint_id = _text(newest[0])
        found = await self._load(keys, thread_id, ns, [checkpoint_id])
        return found[0] if found else None

    async def alist(
        self,
        config: runnables.RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: runnables.RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[base.CheckpointTuple]:
        conf = config["configurable"] if config else {}
        thread_ids = [str(conf["thread_id"])] if config else await self._all_threads()
        only_ns: str | None = conf.get("checkpoint_ns")
        only_id = base.get_checkpoint_id(config) if config else None
        before_id = base.get_checkpoint_id(before) if before else None
        remaining = limit
        for thread_id in thread_ids:
            keys = self._keys(thread_id)
            if only_ns is not None:
                namespaces = [only_ns]
            else:
                namespaces = sorted(_text(m) for m in await self.redis.smembers(keys.namespaces))
            for ns in namespaces:
                found_in_ns = self._list_namespace(
                    keys,
                    thread_id,
                    ns,
                    only_id=only_id,
                    before_id=before_id,
                    filter=filter,
                    hint=None if filter else remaining,
                )
                async for found in found_in_ns:
                    if remaining is not None:
                        if remaining <= 0:
                            return
                        remaining -= 1
                    yield found
                if remaining is not None and remaining <= 0:
                    return

    async def _list_namespace(
        self,
        keys: _Keys,
        thread_id: str,
        ns: str,
        *,
        only_id: str | None,
        before_id: str | None,
        filter: dict[str, Any] | None,
        hint: int | None,
    ) -> AsyncIterator[base.CheckpointTuple]:
        """Newest first, in pages, so a small `limit` reads little."""
        if only_id:
            wanted = [] if before_id is not None and only_id >= before_id else [only_id]
            pages: AsyncIterator[Sequence[str]] = _single(wanted)
        else:
            pages = self._id_pages(keys.index(ns), before_id, hint)
        async for ids in pages:
            for found in await self._load(keys, thread_id, ns, ids):
                if filter and not all(found.metadata.get(k) == v for k, v in filter.items()):
                    continue
                yield found

    async def _id_pages(
        self, index: str, before_id: str | None, hint: int | None
    ) -> AsyncIterator[Sequence[str]]:
        upper = f"({before_id}" if before_id else "+"
        size = min(_PAGE, max(hint, 1)) if hint is not None else _PAGE
        while True:
            raw = await self.redis.zrevrangebylex(index, upper, "-", start=0, num=size)
            if not raw:
                return
            ids = [_text(r) for r in raw]
            yield ids
            if len(ids) < size:
                return
            upper = f"({ids[-1]}"
            size = _PAGE

    async def _load(
        self, keys: _Keys, thread_id: str, ns: str, ids: Sequence[str]
    ) -> list[base.CheckpointTuple]:
        """The stored tuples for `ids` (one namespace), in order, skipping missing ones."""
        if not ids:
            return []
        # One transaction: a checkpoint and its writes are read as of one instant.
        async with self.redis.pipeline(transaction=True) as pipe:
            for checkpoint_id in ids:
                pipe.hgetall(keys.checkpoint(ns, checkpoint_id))
                pipe.hgetall(keys.writes(ns, checkpoint_id))
            replies: list[dict[bytes, bytes]] = await pipe.execute()
        stored = [
            (checkpoint_id, replies[2 * i], replies[2 * i + 1])
            for i, checkpoint_id in enumerate(ids)
            if replies[2 * i]
        ]
        if not stored:
            return []
        # The values: the blob of each (channel, version) the checkpoint names.
        wanted = [list(json.loads(cp[b"versions"]).items()) for _, cp, _ in stored]
        async with self.redis.pipeline(transaction=False) as pipe:
            for versions in wanted:
                if versions:
                    pipe.hmget(keys.blobs(ns), [_blob_field(ch, v) for ch, v in versions])
            blob_replies: Iterator[list[bytes | None]] = iter(await pipe.execute())
        result = []
        for (checkpoint_id, cp, writes), versions in zip(stored, wanted, strict=True):
            values = {}
            blobs = next(blob_replies) if versions else []
            for (channel, _), raw in zip(versions, blobs, strict=True):
                if raw is not None and (typed := _unpack(raw))[0] != _EMPTY:
                    values[channel] = self.serde.loads_typed(typed)
            saved = self.serde.loads_typed(_unpack(cp[b"checkpoint"]))
            parent = cp[b"parent"].decode()
            result.append(
                base.CheckpointTuple(
                    config=_config(thread_id, ns, checkpoint_id),
                    checkpoint=cast(base.Checkpoint, {**saved, "channel_values": values}),
                    metadata=self.serde.loads_typed(_unpack(cp[b"metadata"])),
                    parent_config=_config(thread_id, ns, parent) if parent else None,
                    pending_writes=self._pending_writes(writes),
                )
            )
        return result

    def _pending_writes(self, stored: dict[bytes, bytes]) -> list[base.PendingWrite]:
        rows = []
        for field, raw in stored.items():
            _, idx = json.loads(field)
            header, _, packed = raw.partition(b"\n")
            meta = json.loads(header)
            rows.append((meta["path"], meta["task_id"], idx, meta["channel"], packed))
        # get_tuple must return writes in `writes_sort_key` order (delta channels replay them).
        rows.sort(key=lambda r: base.writes_sort_key(r[0], r[1], r[2]))
        return [
            (task_id, channel, self.serde.loads_typed(_unpack(packed)))
            for _, task_id, _, channel, packed in rows
        ]

    async def _all_threads(self) -> list[str]:
        head = len(self.prefix) + 2  # "<prefix>:{"
        found = {
            _text(key)[head : -len("}:ns")]
            async for key in self.redis.scan_iter(
                match=f"{events.glob_escape(self.prefix)}:{{*}}:ns", count=1000
            )
        }
        return sorted(found)

    # -- deleting, copying, pruning ---------------------------------------------------------

    async def adelete_thread(self, thread_id: str) -> None:
        """Remove the thread's checkpoints and writes, atomically; other keys of the run
        (events, lease) stay. Use the module's `delete_thread` to remove a whole run."""
        keys = self._keys(thread_id)

        async def drop_all(pipe: aioredis.client.Pipeline) -> None:
            members = await self.redis.smembers(keys.registry)
            _multi(pipe)
            pipe.delete(keys.registry, keys.namespaces, *members)

        await self._transaction(keys.registry, drop_all)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Remove the checkpoints (and their writes) whose metadata ``run_id`` is listed.

        Walks every thread under the prefix (a SCAN), so it costs a read of every stored
        checkpoint's small fields; the operator never needs it.
        """
        wanted = set(run_ids)
        if not wanted:
            return

        async def choose(keys: _Keys, ns: str, entries: list[_Entry]) -> set[str]:
            return {e.id for e in entries if e.run_id in wanted}

        for thread_id in await self._all_threads():
            await self._drop(self._keys(thread_id), choose)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, blob and write of a thread to another thread, replacing
        whatever checkpoints the target had. Each side is one transaction."""
        source, target = self._keys(source_thread_id), self._keys(target_thread_id)
        names: list[str] = []

        async def snapshot(pipe: aioredis.client.Pipeline) -> None:
            registered = await self.redis.smembers(source.registry)
            names[:] = [*map(_text, registered), source.namespaces]
            _multi(pipe)
            for name in names:
                pipe.dump(name)

        dumps: list[bytes | None] = await self._transaction(source.registry, snapshot)
        copies = {
            target.root + name[len(source.root) :]: dumped
            for name, dumped in zip(names, dumps, strict=True)
            if dumped is not None
        }
        if not copies:
            return

        async def replace(pipe: aioredis.client.Pipeline) -> None:
            old = await self.redis.smembers(target.registry)
            _multi(pipe)
            pipe.delete(target.registry, target.namespaces, *old)
            for name, dumped in copies.items():
                pipe.restore(name, 0, dumped, replace=True)
            registered = [name for name in copies if name != target.namespaces]
            if registered:
                pipe.sadd(target.registry, *registered)

        await self._transaction(target.registry, replace)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``"delete"`` removes the threads' checkpoints; ``"keep_latest"`` keeps the newest
        checkpoint of each namespace, plus the ancestors its DeltaChannels still replay from
        (back to the nearest snapshot of each), with their writes."""
        if strategy == "delete":
            for thread_id in thread_ids:
                await self.adelete_thread(thread_id)
            return
        if strategy != "keep_latest":
            raise ValueError(f"unknown prune strategy {strategy!r}: use keep_latest or delete")
        for thread_id in thread_ids:
            await self._drop(self._keys(thread_id), self._all_but_latest)

    async def _all_but_latest(self, keys: _Keys, ns: str, entries: list[_Entry]) -> set[str]:
        if not entries:
            return set()
        by_id = {e.id: e for e in entries}
        keep = {entries[-1].id}
        # Counters in the metadata name the DeltaChannels not snapshotted at this checkpoint:
        # their value is rebuilt from ancestors' writes down from the nearest snapshot blob,
        # so that whole path must survive (the DeltaChannel warning on BaseCheckpointSaver).
        for channel in entries[-1].delta_channels:
            entry: _Entry | None = entries[-1]
            while entry is not None:
                keep.add(entry.id)
                if channel in entry.versions:
                    field = _blob_field(channel, entry.versions[channel])
                    raw = await self.redis.hget(keys.blobs(ns), field)
                    if raw is not None and _unpack(raw)[0] != _EMPTY:
                        break
                entry = by_id.get(entry.parent) if entry.parent else None
        return {e.id for e in entries} - keep

    async def _drop(self, keys: _Keys, choose: _Chooser) -> None:
        """Drop the checkpoints `choose` picks, their writes, and the blobs no surviving
        checkpoint names, in one transaction per thread (retried if the thread changes)."""

        async def plan(pipe: aioredis.client.Pipeline) -> None:
            work = []
            for raw_ns in await self.redis.smembers(keys.namespaces):
                ns = _text(raw_ns)
                entries = await self._entries(keys, ns)
                dropped = await choose(keys, ns, entries)
                if dropped:
                    work.append((ns, entries, dropped, await self.redis.hkeys(keys.blobs(ns))))
            _multi(pipe)
            for ns, entries, dropped, blob_fields in work:
                survivors = [e for e in entries if e.id not in dropped]
                doomed = [keys.checkpoint(ns, i) for i in dropped]
                doomed += [keys.writes(ns, i) for i in dropped]
                if not survivors:
                    doomed += [keys.index(ns), keys.blobs(ns)]
                    pipe.srem(keys.namespaces, ns)
                else:
                    pipe.zrem(keys.index(ns), *dropped)
                    named = set().union(*(e.blob_fields for e in survivors))
                    unnamed = {_text(f) for f in blob_fields} - named
                    if unnamed:
                        pipe.hdel(keys.blobs(ns), *unnamed)
                pipe.delete(*doomed)
                pipe.srem(keys.registry, *doomed)

        await self._transaction(keys.registry, plan)

    async def _entries(self, keys: _Keys, ns: str) -> list[_Entry]:
        ids = [_text(i) for i in await self.redis.zrange(keys.index(ns), 0, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for checkpoint_id in ids:
                pipe.hmget(
                    keys.checkpoint(ns, checkpoint_id), ["parent", "versions", "run_id", "delta"]
                )
            rows: list[list[bytes | None]] = await pipe.execute()
        entries = []
        for checkpoint_id, (parent, versions, run_id, delta) in zip(ids, rows, strict=True):
            if versions is None:  # indexed but gone: nothing to keep or free
                continue
            entries.append(
                _Entry(
                    id=checkpoint_id,
                    parent=parent.decode() if parent else None,
                    versions=json.loads(versions),
                    run_id=run_id.decode() if run_id else "",
                    delta_channels=tuple(json.loads(delta)) if delta else (),
                )
            )
        return entries

    async def _transaction(
        self, watched: str, prepare: Callable[[aioredis.client.Pipeline], Awaitable[None]]
    ) -> list[Any]:
        """Optimistic transaction: WATCH `watched`, let `prepare` read (on other connections)
        and queue writes after ``pipe.multi()``, EXEC; start over if `watched` changed.
        Every write of a thread adds a key name to its registry, so watching the registry
        catches any concurrent `aput`/`aput_writes`."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(watched)
                    await prepare(pipe)
                    return await pipe.execute()
                except redis_exceptions.WatchError:
                    continue

    # -- versions ---------------------------------------------------------------------------

    def get_next_version(self, current: str | int | None, channel: None) -> str:
        """Zero-padded counter plus a random fraction, as LangGraph's own savers: versions
        sort as strings, and two forks of one checkpoint never share a blob key."""
        if current is None:
            number = 0
        elif isinstance(current, int):
            number = current
        else:
            number = int(current.split(".")[0])
        return f"{number + 1:032}.{random.random():016}"

    # -- the synchronous API: not supported -------------------------------------------------

    def get_tuple(self, config: runnables.RunnableConfig) -> base.CheckpointTuple | None:
        raise NotImplementedError(_ASYNC_ONLY.format(name="aget_tuple"))

    def list(
        self,
        config: runnables.RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: runnables.RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[base.CheckpointTuple]:
        raise NotImplementedError(_ASYNC_ONLY.format(name="alist"))

    def put(
        self,
        config: runnables.RunnableConfig,
        checkpoint: base.Checkpoint,
        metadata: base.CheckpointMetadata,
        new_versions: base.ChannelVersions,
    ) -> runnables.RunnableConfig:
        raise NotImplementedError(_ASYNC_ONLY.format(name="aput"))

    def put_writes(
        self,
        config: runnables.RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        raise NotImplementedError(_ASYNC_ONLY.format(name="aput_writes"))

    def delete_thread(self, thread_id: str) -> None:
        raise NotImplementedError(_ASYNC_ONLY.format(name="adelete_thread"))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        raise NotImplementedError(_ASYNC_ONLY.format(name="adelete_for_runs"))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        raise NotImplementedError(_ASYNC_ONLY.format(name="acopy_thread"))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        raise NotImplementedError(_ASYNC_ONLY.format(name="aprune"))


def _config(thread_id: str, ns: str, checkpoint_id: str) -> runnables.RunnableConfig:
    return {
        "configurable": {
            "thread_id": thread_id,
            "checkpoint_ns": ns,
            "checkpoint_id": checkpoint_id,
        }
    }


async def _single(pages: Sequence[str]) -> AsyncIterator[Sequence[str]]:
    yield pages
