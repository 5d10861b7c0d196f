"""The `artifactfs` command line.

Heavy libraries (SQLAlchemy, pygit2, pyfuse3) are imported inside the commands that need them:
every command pays only for what it uses.
"""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TextIO

from .config import Settings, load_settings
from .model import ArtifactError, InvalidInput
from .remotes import escaped, printable, redact, unprintable

if TYPE_CHECKING:
    from .model import RepoState
    from .registry import Registry

PROG = "artifactfs"
USAGE_ERROR = 2
MAX_REMOTE_LENGTH = 8192

log = logging.getLogger("artifactfs.cli")
_opened: list["Registry"] = []  # closed when the command ends: the last one out tidies the WAL


def open_registry(settings: Settings) -> "Registry":
    from .registry import open_registry

    settings.ensure_dirs()
    registry = open_registry(settings.database_url, host=settings.host, busy_timeout=settings.db_busy_timeout)
    _opened.append(registry)
    return registry


def read_remote(stdin: TextIO) -> str:
    """`--remote -`: the remote URL from standard input, one line, so that a token in it never
    appears on a command line (`ps` shows those to every local user). Not echoed on a terminal."""
    if stdin.isatty():
        return getpass.getpass("remote URL (not shown): ")
    line = stdin.readline(MAX_REMOTE_LENGTH + 1)
    if len(line) > MAX_REMOTE_LENGTH:
        raise InvalidInput(f"--remote -: the first line of standard input is longer than {MAX_REMOTE_LENGTH} characters")
    line = line.removesuffix("\n").removesuffix("\r")
    if not line:
        raise InvalidInput("--remote -: standard input holds no remote: write the URL on its first line")
    return line


# --- commands ---


def scoped_registry(settings: Settings, host: str | None) -> "Registry":
    """The registry as `--host` sees it (this host, ARTIFACTFS_HOST, by default)."""
    from .remotes import validate_host

    registry = open_registry(settings)
    return registry if host is None else registry.for_host(validate_host(host))


def listed_repos(args: argparse.Namespace, settings: Settings) -> list["RepoState"]:
    """The repositories a listing shows: one host's (--host, default this one), or every host's."""
    return scoped_registry(settings, args.host).repos(all_hosts=args.all_hosts)


def on_host(settings: Settings, host: str) -> str:
    """' on H' when a command acts on another host than this one."""
    return "" if host == settings.host else f" on {host}"


def cmd_add_repo(args: argparse.Namespace, settings: Settings) -> int:
    from .remotes import validate_name
    from .repos import add_repo, add_repo_async, parse_add_request

    validate_name(args.name)
    remote = read_remote(sys.stdin) if args.remote == "-" else args.remote
    registry = scoped_registry(settings, args.host)
    req = parse_add_request(
        settings, registry, args.name, remote, args.ref, args.mount_root,
        prepared_gitdir=args.prepared_gitdir, git_dir=args.git_dir, fetch_ref=args.fetch_ref, owner=args.owner,
        blob_filter=args.blob_filter,
    )  # fmt: skip
    where = on_host(settings, registry.host)
    if args.asynchronous:
        add_repo_async(settings, registry, req)
        print(f"queued {req.name}{where}")
    else:
        add_repo(settings, registry, req)
        print(f"added {req.name}{where}")
    return 0


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from .remotes import validate_name
    from .repos import request_prepare

    registry = scoped_registry(settings, args.host)
    request = request_prepare(settings, registry, validate_name(args.name))
    where = on_host(settings, registry.host)
    if request.head is None:
        print(f"queued {args.name}{where} (attempt {request.attempt})")
    else:
        print(f"prepared {args.name}{where} (attempt {request.attempt}, head {request.head})")
    return 0


def cmd_list_repos(args: argparse.Namespace, settings: Settings) -> int:
    from .repos import display_state

    for repo in listed_repos(args, settings):
        state = display_state(settings, repo).value
        print(f"{repo.name}\t{state}\t{repo.remote_url}\t{repo.ref}\t{repo.mount_path}\thost={repo.host}")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from .remotes import validate_name
    from .repos import status_row

    if args.name is not None:
        validate_name(args.name)
        if args.all_hosts:
            repos = [r for r in listed_repos(args, settings) if r.name == args.name]
            if not repos:
                from .model import UnknownRepo

                raise UnknownRepo(args.name)
        else:
            repos = [scoped_registry(settings, args.host).require(args.name)]
    else:
        repos = listed_repos(args, settings)
    rows = [status_row(settings, repo) for repo in repos]
    if args.json:
        print(json.dumps(rows if args.name is None or args.all_hosts else rows[0], indent=2))
    else:
        for row in rows:
            print(" ".join(f"{key}={shlex.quote(str(value)) if value != '' else ''}" for key, value in row.items()))
    return 0


def cmd_remove_repo(args: argparse.Namespace, settings: Settings) -> int:
    from .remotes import validate_name
    from .repos import remove_repo

    validate_name(args.name)
    registry = scoped_registry(settings, args.host)
    remove_repo(settings, registry, args.name)
    print(f"removed {args.name}{on_host(settings, registry.host)}")
    return 0


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    from .remotes import validate_name

    validate_name(args.name)
    events = scoped_registry(settings, args.host).events(args.name, all_hosts=args.all_hosts)
    if not events:
        from .model import UnknownRepo

        raise UnknownRepo(args.name)
    if args.json:
        print(json.dumps([
            {"position": e.id, "host": e.host, "version": e.version, "type": e.type, "time": e.created_at.isoformat(),
             "job_id": e.job_id, "payload": e.payload}
            for e in events
        ], indent=2))  # fmt: skip
        return 0
    for e in events:
        payload = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in e.payload.items())
        job = f" job={e.job_id}" if e.job_id else ""
        print(f"{e.created_at.isoformat(timespec='milliseconds')} host={e.host} v{e.version} {e.type}{job} {payload}".rstrip())
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from .registry import migrate_registry
    from .schema import HEAD

    settings.ensure_dirs()
    applied = migrate_registry(settings.database_url, settings.host, settings.db_busy_timeout)
    if applied:
        print(f"migrated the registry to revision {HEAD} (applied {', '.join(applied)})")
    else:
        print(f"the registry is at revision {HEAD}: nothing to migrate")
    return 0


def cmd_daemon(args: argparse.Namespace, settings: Settings) -> int:
    from mountd.daemon import run_daemon

    run_daemon(settings, open_registry(settings))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.app import app

    settings.ensure_dirs()
    app.worker_main([
        "worker", "--queues", settings.queue, "--hostname", f"artifactfs@{settings.host}",
        "--concurrency", str(args.concurrency), "--task-events", "--loglevel", args.log_level.upper(),
        "--without-gossip", "--without-mingle",
    ])  # fmt: skip
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from .stack import up

    for line in up(settings, flower_port=args.flower_port, concurrency=args.concurrency):
        print(line)
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from .stack import down

    for line in down(settings, keep_mounts=args.keep_mounts):
        print(line)
    return 0


# --- parsing ---


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (argparse prints the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{PROG}: error: {printable(redact(message))} (see: {self.prog} --help)\n")


def host_option(p: "argparse._ActionsContainer", what: str) -> None:
    p.add_argument("--host", metavar="HOST", help=f"{what} (default: this host, $ARTIFACTFS_HOST)")


def hosts_options(p: argparse.ArgumentParser) -> None:
    """--host H or --all-hosts, never both (a usage error)."""
    group = p.add_mutually_exclusive_group()
    host_option(group, "the repositories of HOST")
    group.add_argument("--all-hosts", action="store_true", help="the repositories of every host of the fleet")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Mount Git repositories as lazily hydrated working trees.",
    )
    parser.add_argument("--log-level", default=os.environ.get("ARTIFACTFS_LOG_LEVEL", "WARNING"), type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace, Settings], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        assert isinstance(p, OneLineParser)
        p.set_defaults(handler=handler)
        return p

    p = command("add-repo", cmd_add_repo, "register a repository and prepare it (blobless clone)")
    p.add_argument("--name", required=True, help="name of the repository and of its mount directory")
    p.add_argument("--remote", required=True,
                   help="file://, git://, http(s):// or ssh:// URL, user@host:path or an absolute path; "
                        "'-' reads it from standard input (keeps a token off the command line)")
    p.add_argument("--ref", default="refs/heads/main", help="branch or tag to mount (default: refs/heads/main)")
    p.add_argument("--mount-root", help="directory to mount under (default: $ARTIFACTFS_MOUNT_ROOT or <root>/mnt)")
    p.add_argument("--async", dest="asynchronous", action="store_true",
                   help="return once registered; a worker prepares it while mountd shows a gated placeholder")
    p.add_argument("--prepared-gitdir", action="store_true",
                   help="fetch into an existing git directory (--git-dir) instead of cloning")
    p.add_argument("--git-dir", help="with --prepared-gitdir: the git directory to fetch into")
    p.add_argument("--fetch-ref", help="with --prepared-gitdir: the remote ref to fetch into --ref")
    p.add_argument("--owner", metavar="USER",
                   help="user (name or uid) the mounted files and the git directory belong to, so that "
                        "this user's git works in the mount (default: root)")
    host_option(p, "register it for HOST of the fleet: its mountd mounts it and its worker prepares it")
    p.add_argument("--filter", dest="blob_filter", metavar="FILTER",
                   help="partial-clone filter: blob:none (default: no file content arrives with the clone) or "
                        "blob:limit=SIZE (files smaller than SIZE, e.g. 64k, arrive with it, and their sizes)")

    p = command("prepare", cmd_prepare, "prepare a repository again (after a failure, or to refresh it)")
    p.add_argument("--name", required=True)
    host_option(p, "the repository of HOST")

    p = command("list-repos", cmd_list_repos, "list registered repositories")
    hosts_options(p)

    p = command("status", cmd_status, "show state, head and hydration of repositories")
    p.add_argument("--name", help="only this repository")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    hosts_options(p)

    p = command("remove-repo", cmd_remove_repo, "unmount a repository and delete its state")
    p.add_argument("--name", required=True)
    host_option(p, "the repository of HOST (its mountd unmounts it and deletes its state)")

    p = command("events", cmd_events, "show the event history of a repository")
    p.add_argument("--name", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    hosts_options(p)

    command("migrate", cmd_migrate, "bring the registry's schema to this version's (artifactfs up runs it)")

    command("daemon", cmd_daemon, "run mountd: mount every registered repository until SIGTERM")

    p = command("worker", cmd_worker, "run a Celery worker for this host's prepare jobs")
    p.add_argument("--concurrency", type=int, default=2, help="prepare jobs run at once (default 2)")

    p = command("up", cmd_up, "start the embedded stack: redis-server, a worker, mountd and Flower")
    # A string default goes through type=int too: a bad ARTIFACTFS_FLOWER_PORT is a usage error.
    p.add_argument("--flower-port", type=int, default=os.environ.get("ARTIFACTFS_FLOWER_PORT") or "5555",
                   help="Flower's port on 127.0.0.1 (default: $ARTIFACTFS_FLOWER_PORT or 5555)")
    p.add_argument("--concurrency", type=int, default=2, help="the worker's prepare jobs at once")

    p = command("down", cmd_down, "stop what `up` started, then unmount every repository")
    p.add_argument("--keep-mounts", action="store_true",
                   help="leave the mounts serving (their processes outlive mountd; the next mountd adopts them)")
    return parser




def unprintable_argument(argv: Sequence[str]) -> str | None:
    """An error naming the first argument that holds a control character, or None.

    Checked before argparse, which echoes values in its errors. Only the character is shown,
    escaped: the value may hold a secret (a URL with a token).
    """
    for index, arg in enumerate(argv):
        char = unprintable(arg)
        if char is None:
            continue
        flag, sep, _ = arg.partition("=")
        if arg.startswith("--") and sep and unprintable(flag) is None:
            what = f"the value of {flag}"
        elif index > 0 and argv[index - 1].startswith("-") and "=" not in argv[index - 1]:
            what = f"the value of {printable(argv[index - 1])}"
        else:
            what = "it"
        return (
            f"argument {index + 1} ({what}) contains the control character {escaped(char)} "
            f"(U+{ord(char):04X}): remove it"
        )
    return None


def report(message: str) -> None:
    """An error as one line on stderr: secrets redacted, control characters escaped."""
    print(f"{PROG}: error: {printable(redact(message))}", file=sys.stderr)


def describe_os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}: check the path, its permissions and free space, and retry"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    problem = unprintable_argument(argv)
    if problem is not None:
        report(f"{problem} (see: {PROG} --help)")
        return USAGE_ERROR
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = load_settings()
        # What we create (git dirs, the registry, logs, sockets) is root's alone unless the
        # settings share git dirs with the sandboxes' users.
        os.umask(settings.umask)
        return args.handler(args, settings)
    except ArtifactError as exc:
        report(str(exc))
        return 1
    except OSError as exc:
        report(describe_os_error(exc))
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line; --log-level DEBUG shows where
        log.debug("unexpected error", exc_info=True)
        report(f"internal error: {type(exc).__name__}: {exc} (run with --log-level DEBUG for details)")
        return 1
    finally:
        while _opened:
            try:
                _opened.pop().close()
            except Exception:  # closing is tidying up: it must not hide the command's outcome
                pass


if __name__ == "__main__":
    sys.exit(main())
