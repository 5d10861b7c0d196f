"""One FUSE session: the process mountd starts for each mount (pyfuse3 allows one per process).

It starts as a warm spare (imports done), mounts a gated placeholder on mountd's first order, then
takes orders on a control socket of its own (mountd/control.py): {"op": "ready", ...} opens the
gate on a commit, {"op": "failed", ...} makes every operation fail with EIO, {"op": "reset"} closes
the gate again, {"op": "unmount"} ends the session.

It does not depend on mountd once mounted: it runs in a session of its own and keeps serving when
mountd exits, crashes or restarts, and the next mountd finds it by its pid file and socket under
<root>/run/mounts and adopts it. SIGTERM, SIGINT or an unmount (fusermount3 -u) end it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from artifactfs.config import Settings, load_settings
from artifactfs.fs.backfill import Backfill, BackfillProgress
from artifactfs.fs.gate import Gate
from artifactfs.fs.hydrator import FetchStats, Hydrator
from artifactfs.fs.operations import TreeFS
from artifactfs.fs.overlay import Overlay
from artifactfs.fs.warmup import WarmUp
from artifactfs.gitstore import git_env
from artifactfs.logs import configure as configure_logging
from artifactfs.logs import set_context as set_log_context
from artifactfs.metrics import MULTIPROC_ENV, enable, open_files
from artifactfs.model import BackfillPolicy, BackfillState, Owner
from artifactfs.mounts import check_mount_path
from artifactfs.owners import become, owner_of
from artifactfs.procs import read_pid_file, write_pid_file
from artifactfs.remotes import validate_name
from mountd import control

log = logging.getLogger("artifactfs.mount")

# Operations waiting at a closed gate each hold a pyfuse3 worker task; keep plenty so that the
# operations that never wait (root getattr, statfs, release) are always served.
MAX_TASKS = 4096
STOP_GRACE_SECONDS = 2.0
# How often the mount looks whether git moved HEAD (commit, checkout, reset) to move its base
# along; git's own fsmonitor query makes it look at once as well.
FOLLOW_HEAD_SECONDS = 1.0


def others_may_read() -> bool:
    """allow_other needs root, or user_allow_other in /etc/fuse.conf (fusermount3 refuses it)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as fh:
            return any(line.strip() == "user_allow_other" for line in fh)
    except OSError:
        return False


class MountProcess:
    def __init__(self, settings: Settings, name: str, mount_path: Path, owner: Owner | None = None) -> None:
        self.settings = settings
        self.name = name
        self.mount_path = mount_path
        self.stats_file = settings.stats_file(name)
        self.gate = Gate()
        self.owner = owner
        self.controller_uid = os.getuid()  # mountd's: the only peer whose orders count
        # A repository with an owner gets its overlay once this process has become the owner
        # (become_owner): root never opens a directory the owner can change.
        overlay = Overlay(settings.overlay_dir(name)) if owner is None else None
        ids = (owner.uid, owner.gid) if owner is not None else None
        self.fs = TreeFS(self.gate, overlay, fsname=f"artifactfs:{name}", owner=ids)
        self.shown: tuple[str, str] | None = None
        self.nursery: trio.Nursery | None = None
        # The backfill of the commit shown (see fs/backfill.py): it starts at the first read
        # that misses, once the repository has had one, or at ready, as the setting says.
        self.used = False
        self.backfill = BackfillProgress(BackfillState.OFF if settings.backfill is BackfillPolicy.NEVER else BackfillState.WAITING)
        self._backfill_scope: trio.CancelScope | None = None
        self.fs.on_miss = self._first_miss
        self.warm_up: WarmUp | None = None  # of the commit shown last (fs/warmup.py)

    def become_owner(self) -> None:
        """Give up root for the repository's owner, once mounted (add-repo --owner; see owners.py).

        Their overlay directory is made (or found) inside the root-only state directory of the
        repository, given to them, and only then is the way to it opened; from here on this
        process reads their git directory and writes their overlay with their rights alone."""
        owner = self.owner
        if owner is None:
            return
        overlay_dir = self.settings.overlay_dir(self.name)
        overlay_dir.mkdir(mode=0o700, exist_ok=True)
        found = overlay_dir.lstat()
        if not stat.S_ISDIR(found.st_mode) or found.st_uid not in (0, owner.uid):
            raise PermissionError(f"{overlay_dir} is not a directory of root's or {owner.name}'s")
        if found.st_uid == 0:
            os.lchown(overlay_dir, owner.uid, owner.gid)
        for path in (self.settings.state_root, self.settings.repo_state_dir(self.name)):
            self.settings.open_to_owner(path)
        become(owner)
        self.fs.use_overlay(Overlay(overlay_dir))

    def mount(self) -> None:
        # default_permissions: the kernel checks the modes we report against the caller.
        options = set(pyfuse3.default_options) | {f"fsname=artifactfs:{self.name}", "subtype=artifactfs", "default_permissions"}
        if others_may_read():
            options.add("allow_other")  # sandboxes run as other users than mountd
        pyfuse3.init(self.fs, str(self.mount_path), options)

    async def serve(self, listener: socket.socket) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._control, trio.socket.from_stdlib_socket(listener))
            nursery.start_soon(self._signals)
            nursery.start_soon(self._follow_head)
            await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)
            nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: signal %d, unmounting", self.name, signum)
                await self._stop()
                return

    async def _follow_head(self) -> None:
        while True:
            await trio.sleep(FOLLOW_HEAD_SECONDS)
            self.fs.follow_head_safely()

    async def _stop(self) -> None:
        """End the session. pyfuse3.main returns only once every handler has: callers waiting at
        the gate get EIO, and whatever still hangs after a grace period (a fetch) is cancelled."""
        self.gate.fail("the mount is going away")
        self._end_warm_up()
        pyfuse3.terminate()
        await trio.sleep(STOP_GRACE_SECONDS)
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    async def _control(self, listener: trio.socket.SocketType) -> None:
        """Accept mountd's connections (the one that started us, or a later one adopting us)."""
        assert self.nursery is not None
        while True:
            conn, _ = await listener.accept()
            self.nursery.start_soon(self._converse, conn)

    async def _converse(self, conn: trio.socket.SocketType) -> None:
        """One control connection. Whatever goes wrong here ends this connection, never the mount."""
        try:
            peer = control.peer_credentials(conn)  # type: ignore[arg-type]
            if peer.uid != self.controller_uid:
                log.warning("%s: refused a control connection from uid %d (pid %d)", self.name, peer.uid, peer.pid)
                conn.close()
                return
            async with trio.SocketStream(conn) as stream:
                await self._take_orders(stream)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # that mountd went away: keep serving, the next one connects anew
        except Exception as exc:
            log.error("%s: control connection failed: %s: %s", self.name, type(exc).__name__, exc)

    async def _take_orders(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
            if len(buffer) > control.MAX_LINE:
                return
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                reply = self.obey(line)
                await stream.send_all(control.encode(reply))
                if reply.get("unmounting"):
                    assert self.nursery is not None
                    self.nursery.start_soon(self._stop)
                    return

    def obey(self, line: bytes) -> dict[str, Any]:
        """Carry out one order; the reply says whether it worked, and what this process shows."""
        try:
            order = control.decode(line)
            op = order.get("op")
            if op == "hello":
                pass
            elif op == "ready":
                shown = self._show(Path(order["git_dir"]), str(order["head"]))
                if shown:
                    self._backfill_anew()
                self.gate.open()
                self.fs.follow_head_safely()  # git may have moved HEAD while this process was down
                if shown:
                    self._warm_up(Path(order["git_dir"]))
            elif op == "failed":
                self._end_warm_up()  # its lookups would only meet the EIO
                self.gate.fail(str(order.get("error", "")))
            elif op == "reset":
                self._end_warm_up()  # its lookups would wait at the closed gate
                self.gate.close()
            elif op == "unmount":
                log.info("%s: unmounting on mountd's order", self.name)
                return {"ok": True, "unmounting": True, **self.describe()}
            else:
                return {"ok": False, "error": f"unknown order {op!r}"}
        except Exception as exc:  # a bad order or a broken git dir costs this order, not the mount
            log.error("%s: order failed: %s: %s", self.name, type(exc).__name__, exc)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if op != "hello":
            log.info("%s: gate %s", self.name, self.gate.state.value)
        return {"ok": True, **self.describe()}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mount_path": str(self.mount_path),
            "pid": os.getpid(),
            "gate": self.gate.state.value,
            "git_dir": self.shown[0] if self.shown else None,
            "head": self.shown[1] if self.shown else None,
            "base": str(self.fs.snapshot.commit.id) if self.fs.snapshot else None,  # follows HEAD
            "nodes": len(self.fs.nodes), "handles": len(self.fs.handles),  # bounded across refreshes
            "lookups": self.fs.lookups_served,
            "warmed": dataclasses.asdict(self.warm_up.warmed) if self.warm_up is not None else None,
        }

    def _show(self, git_dir: Path, head: str) -> bool:
        """Show `head` of `git_dir`; False if it is shown already."""
        if self.shown == (str(git_dir), head):
            return False
        hydrator = self.fs.hydrator
        if hydrator is None or hydrator.git_dir != git_dir:
            # Credentials, if the repository has any, come from its git config (a store helper).
            hydrator = Hydrator(git_dir, self.fs.exists, fetch_timeout=self.settings.fetch_timeout,
                                concurrency=self.settings.fetch_concurrency, pack_limit=self.settings.pack_limit,
                                credential_env=git_env(), on_batch=self._write_stats,
                                own_git_dir=git_dir.parent == self.settings.git_root)  # fmt: skip
            assert self.nursery is not None
            self.nursery.start_soon(hydrator.run)
        stale = self.fs.show(git_dir, head, hydrator)
        if self.shown is not None:
            # A new commit: make the kernel forget the names it cached from the old one.
            for parent, name in stale:
                pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
            pyfuse3.invalidate_inode(pyfuse3.ROOT_INODE, attr_only=False)
        self.shown = (str(git_dir), head)
        return True

    def _warm_up(self, git_dir: Path) -> None:
        """Bring what git status reads into the kernel's caches, now that a commit is shown."""
        self._end_warm_up()
        assert self.fs.snapshot is not None and self.nursery is not None
        self.warm_up = WarmUp(self.mount_path, git_dir, str(self.fs.snapshot.commit.id))
        self.nursery.start_soon(self.warm_up.run)

    def _end_warm_up(self) -> None:
        if self.warm_up is not None:
            self.warm_up.cancel()

    # --- the backfill ---

    def _backfill_anew(self) -> None:
        """A new commit is shown: the backfill of the old one (if any) ends, and this one's
        starts now, at the first read that misses, or never, as the setting says."""
        if self._backfill_scope is not None:
            self._backfill_scope.cancel()
            self._backfill_scope = None
        policy = self.settings.backfill
        if policy is BackfillPolicy.NEVER:
            self.backfill = BackfillProgress(BackfillState.OFF)
        elif policy is BackfillPolicy.READY or self.used:
            self._start_backfill()
        else:
            self.backfill = BackfillProgress(BackfillState.WAITING)
        self._write_stats()

    def _first_miss(self) -> None:
        """A read missed: the repository is in use."""
        self.used = True
        if self.backfill.state is BackfillState.WAITING:
            self._start_backfill()

    def _start_backfill(self) -> None:
        snapshot, hydrator = self.fs.snapshot, self.fs.hydrator
        assert snapshot is not None and hydrator is not None and self.nursery is not None
        run = Backfill(hydrator, str(snapshot.commit.tree_id), self._backfill_moved)
        self.backfill = run.progress
        scope = self._backfill_scope = trio.CancelScope()
        self.nursery.start_soon(self._run_backfill, run, scope)

    async def _run_backfill(self, run: Backfill, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await run.run()
            except Exception as exc:  # the backfill is a help, never a reason to end the mount
                log.error("%s: backfill failed: %s: %s", self.name, type(exc).__name__, exc)
                run.progress.state = BackfillState.INCOMPLETE
                self._backfill_moved(run.progress)

    def _backfill_moved(self, progress: BackfillProgress) -> None:
        if progress is self.backfill:
            self._write_stats()

    def _write_stats(self, _stats: FetchStats | None = None) -> None:
        """Record the fetch statistics and the backfill's progress (for status, bench and
        people). It runs inside the hydrator's batch loop, where an error would end the whole
        mount: a statistics file that cannot be written (the state root's file system is full)
        costs the statistics, never the mount. An owner's mount process cannot write into
        root's state directory, and keeps none."""
        if self.owner is not None:
            return
        hydrator = self.fs.hydrator
        record: dict[str, Any] = dict(hydrator.stats.__dict__) if hydrator is not None else {}
        record["backfill"] = self.backfill.as_json()
        tmp = self.stats_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.stats_file)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("%s: could not write %s: %s", self.name, self.stats_file, exc.strerror or exc)


def _await_mount_order() -> dict[str, Any] | None:
    """As a warm spare: say the imports are done, then wait for mountd's mount order."""
    try:
        print("ready", flush=True)
    except BrokenPipeError:
        return None  # the mountd that started us is gone
    line = sys.stdin.buffer.readline()
    if not line:
        return None  # mountd went away before it needed this spare
    order = control.decode(line)
    if order.get("op") != "mount":
        raise ValueError(f"expected a mount order, got {order.get('op')!r}")
    return order


def checked_owner(value: Any) -> Owner | None:
    """The [uid, gid] of a mount order, checked like any input: ids a user other than root has."""
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**32 - 1 for v in value)):  # fmt: skip
        raise ValueError(f"a mount order's owner must be [uid, gid] of a user other than root, not {value!r}")
    return owner_of(value[0], value[1])


def _report_mounted(name: str) -> None:
    """Tell the mountd that started us that the mount is up. If it died meanwhile, the mount
    stays: the pid file and the socket are in place, and the next mountd adopts us."""
    try:
        print("mounted", flush=True)
    except BrokenPipeError:
        log.warning("%s: the mountd that started this mount is gone; serving on until the next one adopts it", name)


def _detach_from_mountd() -> None:
    """Once mounted, nothing ties us to the mountd that started us: not its pipes (their end
    must not end us) and not its session (we were started in a session of our own)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Start as a warm spare: imports done, wait for the first order, {"op": "mount", ...}.

    mountd keeps spares ready, so mounting a placeholder costs milliseconds, not the half a
    second that starting Python and importing pyfuse3, trio and pygit2 take here.
    """
    parser = argparse.ArgumentParser(prog="artifactfs-mount")
    parser.add_argument("--log-level", default=os.environ.get("ARTIFACTFS_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    order = _await_mount_order()
    if order is None:
        return 0
    settings = load_settings()
    name = validate_name(str(order.get("name")))
    configure_logging(args.log_level.upper(), settings.host, text_prefix=f"mount[{name}]")
    set_log_context(repo=name)  # every record of this process is about this repository
    mount_path = check_mount_path(settings, name, str(order.get("mount_path")))
    settings.repo_state_dir(name).mkdir(parents=True, exist_ok=True)
    proc = MountProcess(settings, name, mount_path, checked_owner(order.get("owner")))
    try:
        proc.mount()
    except RuntimeError as exc:
        log.error("%s: cannot mount at %s: %s", name, mount_path, exc)
        return 1
    socket_path, pid_file = settings.mount_socket(name), settings.mount_pid_file(name)
    me = None
    try:
        listener = control.listen(socket_path)
        me = write_pid_file(pid_file, os.getpid())
        if os.environ.get(MULTIPROC_ENV):  # mountd counts: so does each of its mounts
            enable(settings)
            open_files()  # while still root: an owner could not create them there
        proc.become_owner()
        _report_mounted(name)
        _detach_from_mountd()
        trio.run(proc.serve, listener)
    finally:
        # As an owner this process may not unmount, nor remove files of root's: mountd does both
        # once it sees the process gone.
        pyfuse3.close(unmount=os.geteuid() == 0)
        # Leave the socket and pid file alone if a successor already took them over.
        if read_pid_file(pid_file) in (None, me):
            with contextlib.suppress(PermissionError):
                pid_file.unlink(missing_ok=True)
                socket_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
