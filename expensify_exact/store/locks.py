"""Lease locks that work the same on SQLite and PostgreSQL and expire if their holder dies, and how to tell that a
process of this host is gone."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import sqlalchemy as sa

from expensify_exact.errors import LockBusy
from expensify_exact.store.base import StoreBase, utcnow
from expensify_exact.store.schema import locks


class LockStore(StoreBase):
    @contextmanager
    def lock(self, name: str, ttl_seconds: float = 120.0, wait_seconds: float = 300.0) -> Iterator[None]:
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + wait_seconds
        delay = 0.02
        while not self._try_lock(name, owner, ttl_seconds):
            if time.monotonic() > deadline:
                raise LockBusy(f"could not take the lock {name!r} within {wait_seconds:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        try:
            yield
        finally:
            with self.engine.begin() as conn:
                conn.execute(locks.update().where(locks.c.name == name, locks.c.owner == owner)
                             .values(owner=None, expires_at=None))

    def lock_holder(self, name: str) -> str | None:
        """Who holds the lock `name` now ("host:pid:nonce"), or None when it is free or its lease ran out."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(locks.c.owner).where(locks.c.name == name, locks.c.owner.is_not(None),
                                                               locks.c.expires_at >= utcnow())).scalar_one_or_none()

    def _try_lock(self, name: str, owner: str, ttl_seconds: float) -> bool:
        now = utcnow()
        with self.engine.begin() as conn:
            taken = conn.execute(
                locks.update()
                .where(locks.c.name == name, sa.or_(locks.c.owner.is_(None), locks.c.expires_at < now))
                .values(owner=owner, expires_at=now + timedelta(seconds=ttl_seconds))
            ).rowcount
            if taken:
                return True
            try:
                with conn.begin_nested():
                    conn.execute(locks.insert().values(name=name, owner=owner,
                                                       expires_at=now + timedelta(seconds=ttl_seconds)))
                return True
            except sa.exc.IntegrityError:
                pass
            # A holder killed on this host (SIGKILL, OOM) never releases: take over at once instead of waiting
            # out its lease. Holders on other hosts can only be outlived by the lease.
            holder = conn.execute(sa.select(locks.c.owner).where(locks.c.name == name)).scalar_one_or_none()
            if holder and _holder_is_dead_here(holder):
                return bool(conn.execute(
                    locks.update().where(locks.c.name == name, locks.c.owner == holder)
                    .values(owner=owner, expires_at=now + timedelta(seconds=ttl_seconds))).rowcount)
            return False


def _holder_is_dead_here(owner: str) -> bool:
    """Whether a lock owner ("host:pid:nonce") is a process of this host that no longer runs (or is a zombie)."""
    host, _, rest = owner.partition(":")
    return process_gone_here(host, rest.partition(":")[0])


def process_gone_here(host: str, pid_text: str, started: str | None = None) -> bool:
    """Whether process `pid_text` of `host` no longer runs: same host, and no such pid, a zombie, or (with `started`,
    its start time in clock ticks after boot from /proc/<pid>/stat) another process that reuses the pid now."""
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    fields = process_stat(pid)
    if fields is None:
        return False
    return fields[0] == "Z" or (started is not None and fields[19] != started)  # killed, not yet reaped / reused


def process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, start time at [19]); None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return None
