"""`make demo`: the main job on the embedded defaults, start to finish.

Starts the one-host stack (redis-server, a Celery worker, mountd, Flower) unless it is already
running, adds a repository with `add-repo --async`, shows an `ls` of the placeholder blocking until
the blobless clone lands, reads a file and runs git inside the mount, then cleans up what it made.
Offline by default: it builds its own sample remote, served by `git daemon` on 127.0.0.1 with
packs delayed by two seconds so the wait is visible. `--remote URL` (REPO=URL) names a real one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_NAME = "artifactfs-demo"
DELAY_SECONDS = 2


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(argv), flush=True)
    proc = subprocess.run(argv, text=True, capture_output=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: {argv[0]} {argv[1] if len(argv) > 1 else ''} failed")
    return proc


def artifactfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(str(Path(sys.executable).with_name("artifactfs")), *args, check=check)


def artifactfs_quiet(*args: str) -> str:
    return subprocess.run([str(Path(sys.executable).with_name("artifactfs")), *args], capture_output=True, text=True).stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_sample_remote(base: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A small project in a bare repository, served over git:// with slow packs."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "Demo", "GIT_AUTHOR_EMAIL": "demo@example.invalid",
           "GIT_COMMITTER_NAME": "Demo", "GIT_COMMITTER_EMAIL": "demo@example.invalid"}  # fmt: skip
    work = base / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True, env=env)
    (work / "README.md").write_text("# demo\n\nServed by artifactfs before it was cloned.\n")
    for d in range(20):
        (work / "src" / f"pkg{d:02d}").mkdir(parents=True)
        for f in range(25):
            (work / "src" / f"pkg{d:02d}" / f"mod{f:02d}.py").write_text(f"VALUE = {d * 100 + f}\n")
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-q", "-m", "A sample project"], check=True, env=env)
    served = base / "served"
    served.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(served / "demo.git")], check=True, env=env)
    hook = base / "slow-pack.sh"
    hook.write_text(f"#!/bin/sh\nsleep {DELAY_SECONDS}\nexec \"$@\"\n")
    hook.chmod(0o755)
    config = base / "gitconfig"
    config.write_text(f"[uploadpack]\n\tallowFilter = true\n\tpackObjectsHook = {hook}\n")
    port = free_port()
    daemon = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", f"--base-path={served}", "--export-all", "--listen=127.0.0.1",
         f"--port={port}", str(served)],
        env={**env, "GIT_CONFIG_GLOBAL": str(config)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return f"git://127.0.0.1:{port}/demo.git", daemon


def default_branch(url: str) -> str:
    out = subprocess.run(["git", "ls-remote", "--symref", url, "HEAD"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("ref: "):
            return line.split()[1]
    return "refs/heads/main"


def timed_ls(mount: Path) -> None:
    print(f"$ ls {mount}    # blocks until the clone lands", flush=True)
    started = time.monotonic()
    listing = subprocess.run(["ls", str(mount)], capture_output=True, text=True)
    sys.stdout.write(listing.stdout or listing.stderr)
    print(f"   (ls returned after {time.monotonic() - started:.2f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote", help="a real remote to mount instead of the built-in sample")
    parser.add_argument("--ref", help="branch to mount (default: the remote's default branch)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from artifactfs.config import load_settings
    from artifactfs.stack import running_pid

    settings = load_settings()
    base = Path(tempfile.mkdtemp(prefix="artifactfs-demo-"))
    daemon = None
    started_stack = running_pid(settings, "mountd") is None
    try:
        if args.remote:
            remote = args.remote
        else:
            say("A sample remote: a bare repository served by git daemon on 127.0.0.1, packs delayed 2 s")
            remote, daemon = make_sample_remote(base)
            print(remote)
        ref = args.ref or default_branch(remote)
        if started_stack:
            say("Start the one-host stack: redis-server, a Celery worker, mountd, Flower")
            artifactfs("up")
        if DEMO_NAME in artifactfs_quiet("list-repos"):  # left by an interrupted earlier demo
            artifactfs("remove-repo", "--name", DEMO_NAME)

        say("Register the repository: returns in milliseconds, the clone runs in a worker")
        started = time.monotonic()
        artifactfs("add-repo", "--async", "--name", DEMO_NAME, "--remote", remote, "--ref", ref)
        print(f"   (add-repo --async returned after {time.monotonic() - started:.3f} s)")
        mount = Path(settings.mount_path(DEMO_NAME))
        artifactfs("status", "--name", DEMO_NAME)

        say("The placeholder is mounted already; every operation in it waits until the repository is ready")
        timed_ls(mount)
        artifactfs("status", "--name", DEMO_NAME)

        say("Read a file: only its blob is fetched")
        readme = next((p for p in sorted(os.listdir(mount)) if p.lower().startswith("readme")), None)
        if readme:
            run("head", "-n", "5", str(mount / readme))
        run("git", "-C", str(mount), "log", "--oneline", "-3")
        artifactfs("status", "--name", DEMO_NAME)

        say("The event log behind it")
        artifactfs("events", "--name", DEMO_NAME)
        print(f"\nFlower shows the prepare job at http://127.0.0.1:{os.environ.get('ARTIFACTFS_FLOWER_PORT', '5555')}/tasks "
              "while the stack runs (`artifactfs up`).")
    finally:
        say("Clean up")
        if DEMO_NAME in artifactfs_quiet("list-repos"):
            artifactfs("remove-repo", "--name", DEMO_NAME)
        if started_stack:
            artifactfs("down", check=False)
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
