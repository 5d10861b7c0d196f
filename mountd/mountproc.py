"""One FUSE session: the process mountd starts for each mount (pyfuse3 allows one per process).

It mounts a gated placeholder at once and takes orders from mountd, one JSON object per line on
stdin: {"op": "ready", "git_dir": ..., "head": ...} opens the gate on that commit,
{"op": "failed", "error": ...} makes every operation fail with EIO, {"op": "reset"} closes the gate
again (a new preparation attempt). EOF on stdin, SIGTERM or SIGINT unmount and exit.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import pyfuse3
import trio

from artifactfs.fs import TreeFS
from artifactfs.gate import Gate
from artifactfs.gitstore import git_env
from artifactfs.hydrator import FetchStats, Hydrator

log = logging.getLogger("artifactfs.mount")

# Operations waiting at a closed gate each hold a pyfuse3 worker task; keep plenty so that the
# operations that never wait (root getattr, statfs, release) are always served.
MAX_TASKS = 4096


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
    def __init__(self, name: str, mount_path: Path, stats_file: Path | None) -> None:
        self.name = name
        self.mount_path = mount_path
        self.stats_file = stats_file
        self.gate = Gate()
        self.fs = TreeFS(self.gate, fsname=f"artifactfs:{name}")
        self.shown: tuple[str, str] | None = None
        self.nursery: trio.Nursery | None = None

    def mount(self) -> None:
        # default_permissions: the kernel checks the modes we report against the caller.
        options = set(pyfuse3.default_options) | {f"fsname=artifactfs:{self.name}", "subtype=artifactfs", "default_permissions"}
        if others_may_read():
            options.add("allow_other")  # sandboxes run as other users than mountd
        pyfuse3.init(self.fs, str(self.mount_path), options)

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._orders)
            nursery.start_soon(self._signals)
            await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)
            nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: signal %d, unmounting", self.name, signum)
                pyfuse3.terminate()
                return

    async def _orders(self) -> None:
        stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                log.info("%s: mountd went away, unmounting", self.name)
                pyfuse3.terminate()
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    self.obey(json.loads(line))

    def obey(self, order: dict[str, str]) -> None:
        op = order["op"]
        if op == "ready":
            self._show(Path(order["git_dir"]), order["head"])
            self.gate.open()
        elif op == "failed":
            self.gate.fail(order.get("error", ""))
        elif op == "reset":
            self.gate.close()
        else:
            log.warning("%s: unknown order %r", self.name, op)
        log.info("%s: gate %s", self.name, self.gate.state.value)

    def _show(self, git_dir: Path, head: str) -> None:
        if self.shown == (str(git_dir), head):
            return
        hydrator = self.fs.hydrator
        if hydrator is None or hydrator.git_dir != git_dir:
            # Credentials, if the repository has any, come from its git config (a store helper).
            hydrator = Hydrator(git_dir, self.fs.exists, credential_env=git_env(), on_batch=self._write_stats)
            assert self.nursery is not None
            self.nursery.start_soon(hydrator.run)
        stale = self.fs.show(git_dir, head, hydrator)
        if self.shown is not None:
            # A new commit: make the kernel forget the names it cached from the old one.
            for parent, name in stale:
                pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
            pyfuse3.invalidate_inode(pyfuse3.ROOT_INODE, attr_only=False)
        self.shown = (str(git_dir), head)

    def _write_stats(self, stats: FetchStats) -> None:
        if self.stats_file is None:
            return
        tmp = self.stats_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats.__dict__))
        os.replace(tmp, self.stats_file)


def main(argv: list[str] | None = None) -> int:
    """Start as a warm spare: imports done, wait for the first order, {"op": "mount", ...}.

    mountd keeps one spare ready, so mounting a placeholder costs milliseconds, not the half a
    second that starting Python and importing pyfuse3, trio and pygit2 take here.
    """
    parser = argparse.ArgumentParser(prog="artifactfs-mount")
    parser.add_argument("--log-level", default=os.environ.get("ARTIFACTFS_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    print("ready", flush=True)  # imports done: mountd can count on this spare
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # mountd went away before it needed this spare
    order = json.loads(line)
    assert order["op"] == "mount", order
    name = order["name"]
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s mount[{name}] %(levelname)s %(message)s")
    stats_file = Path(order["stats_file"]) if order.get("stats_file") else None
    proc = MountProcess(name, Path(order["mount_path"]), stats_file)
    try:
        proc.mount()
    except RuntimeError as exc:
        log.error("%s: cannot mount at %s: %s", name, order["mount_path"], exc)
        return 1
    if stats_file is not None:
        (stats_file.parent / "mount.pid").write_text(f"{os.getpid()}\n")  # for operators and tests
    print("mounted", flush=True)
    try:
        trio.run(proc.serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
