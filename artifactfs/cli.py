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
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NoReturn, TextIO

from .config import DEFAULT_FLOWER_PORT, DEFAULT_METRICS_PORT, Settings, load_settings, positive_seconds
from .logs import LogFormat
from .logs import configure as configure_logging
from .model import ArtifactError, InvalidInput
from .remotes import escaped, printable, redact, unprintable

if TYPE_CHECKING:
    from .model import RepoState
    from .progress import Reporter
    from .registry import Registry

PROG = "artifactfs"
# Exit codes (README, "Exit codes"): 0 done; FAILURE for every error the command names (bad input,
# an unknown repository, a preparation that failed, an unreachable registry); USAGE_ERROR for a
# command line argparse refuses; INTERRUPTED for Ctrl-C (a `status --watch` ends with 0).
FAILURE = 1
USAGE_ERROR = 2
INTERRUPTED = 130
SERVICES = ("daemon", "worker", "serve-metrics")  # long-running: --json is their log's format
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


def listed_repos(args: argparse.Namespace, registry: "Registry") -> list["RepoState"]:
    """The repositories a listing shows: one host's (--host, default this one), or every host's."""
    return registry.repos(all_hosts=args.all_hosts)


def say(args: argparse.Namespace, line: str, data: object) -> None:
    """The command's result: `line` for people, or `data` as JSON with --json."""
    print(json.dumps(data, indent=2) if args.json else line)


def reporter(args: argparse.Namespace, name: str) -> "Reporter":
    """Progress on standard error (the result goes to standard output): a bar on a terminal,
    plain lines elsewhere, nothing with --quiet."""
    from .progress import Reporter, mode_for

    return Reporter(name, mode_for(args.quiet, sys.stderr))


def cmd_add_repo(args: argparse.Namespace, settings: Settings) -> int:
    from .remotes import validate_name
    from .repos import add_repo, add_repo_async, on_host, parse_add_request, status_row

    validate_name(args.name)
    remote = read_remote(sys.stdin) if args.remote == "-" else args.remote
    registry = scoped_registry(settings, args.host)
    req = parse_add_request(
        settings, registry, args.name, remote, args.ref, args.mount_root,
        prepared_gitdir=args.prepared_gitdir, git_dir=args.git_dir, fetch_ref=args.fetch_ref, owner=args.owner,
        blob_filter=args.blob_filter, require_commit=args.require_commit, depth=args.depth, refresh=args.refresh,
    )  # fmt: skip
    where = on_host(settings, registry.host)
    if args.asynchronous:
        add_repo_async(settings, registry, req)
        say(args, f"queued {req.name}{where}", status_row(settings, registry.require(req.name)))
        return 0
    progress = reporter(args, req.name)
    try:
        repo = add_repo(settings, registry, req, progress)
    finally:
        progress.close()
    say(args, f"added {req.name}{where}", status_row(settings, repo))
    return 0


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from .remotes import validate_name
    from .repos import follow_attempt, on_host, request_prepare, status_row

    registry = scoped_registry(settings, args.host)
    progress = reporter(args, args.name)
    try:
        request = request_prepare(settings, registry, validate_name(args.name), progress)
        head = request.head
        if head is None and args.wait:
            head = follow_attempt(settings, registry, args.name, request.version, progress).head
    finally:
        progress.close()
    where = on_host(settings, registry.host)
    data = {**status_row(settings, registry.require(args.name)), "attempt": request.attempt}
    if head is None:
        say(args, f"queued {args.name}{where} (attempt {request.attempt})", data)
    else:
        say(args, f"prepared {args.name}{where} (attempt {request.attempt}, head {head})", data)
    return 0


def cmd_list_repos(args: argparse.Namespace, settings: Settings) -> int:
    from .repos import display_state

    rows = [
        {"name": repo.name, "state": display_state(settings, repo).value, "remote": repo.remote_url, "ref": repo.ref,
         "mount_path": repo.mount_path, "host": repo.host}
        for repo in listed_repos(args, scoped_registry(settings, args.host))
    ]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print("\t".join(str(row[key]) for key in ("name", "state", "remote", "ref", "mount_path")) + f"\thost={row['host']}")
    return 0


def status_rows(args: argparse.Namespace, settings: Settings, registry: "Registry") -> list[dict[str, object]]:
    from .repos import status_row

    if args.name is not None:
        if args.all_hosts:
            repos = [r for r in listed_repos(args, registry) if r.name == args.name]
            if not repos:
                from .model import UnknownRepo

                raise UnknownRepo(args.name)
        else:
            repos = [registry.require(args.name)]
    else:
        repos = listed_repos(args, registry)
    return [status_row(settings, repo) for repo in repos]


def status_line(row: dict[str, object]) -> str:
    return " ".join(f"{key}={shlex.quote(str(value)) if value != '' else ''}" for key, value in row.items())


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from .remotes import validate_name

    if args.name is not None:
        validate_name(args.name)
    registry = scoped_registry(settings, args.host)
    if args.watch:
        return watch_status(args, settings, registry)
    rows = status_rows(args, settings, registry)
    if args.json:
        print(json.dumps(rows if args.name is None or args.all_hosts else rows[0], indent=2))
    else:
        for row in rows:
            print(status_line(row))
    return 0


def watch_status(args: argparse.Namespace, settings: Settings, registry: "Registry") -> int:
    """Follow changes live: every row at the start, then each row that changes (with --json, one
    object per line), until Ctrl-C. A repository removed meanwhile shows once as `removed`."""
    import time

    shown: dict[tuple[object, object], dict[str, object]] = {}
    try:
        while True:
            rows = {(row["host"], row["repo"]): row for row in status_rows(args, settings, registry)}
            gone = [{**old, "state": "removed"} for key, old in shown.items() if key not in rows]
            for row in [*gone, *(row for key, row in rows.items() if shown.get(key) != row)]:
                print(json.dumps(row) if args.json else status_line(row), flush=True)
            shown = rows
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0  # how a watch ends


def cmd_remove_repo(args: argparse.Namespace, settings: Settings) -> int:
    from .remotes import validate_name
    from .repos import on_host, remove_repo

    validate_name(args.name)
    registry = scoped_registry(settings, args.host)
    remove_repo(settings, registry, args.name)
    say(args, f"removed {args.name}{on_host(settings, registry.host)}", {"name": args.name, "host": registry.host, "removed": True})
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


def local_repo(settings: Settings, name: str) -> "RepoState":
    """A repository of this host, whose git directory is here."""
    from .remotes import validate_name

    return open_registry(settings).require(validate_name(name))


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def cmd_fsck(args: argparse.Namespace, settings: Settings) -> int:
    from .partial.toolkit import fsck

    result = fsck(settings, local_repo(settings, args.name), fetch_missing=args.fetch_missing)
    if args.json:
        print(json.dumps({"name": args.name, **result}, indent=2))
    else:
        fetched = f", after fetching {result['fetched']} objects" if args.fetch_missing else ""
        print(f"{args.name}: head {result['head']}{fetched}")
        print(f"present {result['present']}, missing but promised {result['missing_promised']}, "
              f"missing and not promised {result['missing_unpromised']}, corrupt {result['corrupt']}")  # fmt: skip
        for kind, totals in result["present_by_type"].items():
            print(f"  {kind:6} {totals['count']:>9} objects {human_bytes(totals['bytes']):>11}")
        for hole in result["holes"]:
            print(f"hole: {hole['type']} {hole['id']} {hole['path'] or '-'} (named by {hole['referenced_by']})")
        for bad in result["corrupt_objects"]:
            print(f"corrupt: {bad['id']} {bad['path'] or '-'} (named by {bad['referenced_by']})")
    if result["missing_unpromised"] or result["corrupt"]:
        if not args.json:
            print(f"{PROG}: {args.name}: {result['missing_unpromised']} objects missing and not promised, "
                  f"{result['corrupt']} corrupt: no fetch will mend them; prepare the repository again "
                  f"(artifactfs remove-repo, then add-repo)", file=sys.stderr)  # fmt: skip
        return FAILURE
    return 0


def cmd_prefetch(args: argparse.Namespace, settings: Settings) -> int:
    from .partial.toolkit import PlanSpec, prefetch

    chosen = [bool(args.paths), args.history is not None, args.diff is not None, args.rev is not None]
    if sum(chosen) != 1:
        raise InvalidInput("prefetch needs exactly one planner: --paths GLOB..., --history PATH, --diff A B or --rev REV")
    if args.max_count is not None and args.history is None:
        raise InvalidInput("--max-count goes with --history PATH")
    spec = PlanSpec(paths=tuple(args.paths or ()), history=args.history, max_count=args.max_count,
                    diff=tuple(args.diff) if args.diff else None, rev=args.rev)  # type: ignore[arg-type]  # fmt: skip
    result = prefetch(settings, local_repo(settings, args.name), spec, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"name": args.name, "dry_run": args.dry_run, **result}, indent=2))
        return 0
    print(f"{args.name}: {result['plan']} at {result['commit']}")
    print(f"objects needed {result['needed']}, present {result['present']}, missing {result['missing']}")
    if args.dry_run:
        print(f"would fetch {result['missing']} objects in {result['transactions']} transaction(s)")
    else:
        print(f"fetched {result['fetched']} objects in {result['transactions']} transaction(s)")
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from .registry import migrate_registry
    from .schema import HEAD

    settings.ensure_dirs()
    applied = migrate_registry(settings.database_url, settings.host, settings.db_busy_timeout)
    data = {"revision": HEAD, "applied": applied}
    if applied:
        say(args, f"migrated the registry to revision {HEAD} (applied {', '.join(applied)})", data)
    else:
        say(args, f"the registry is at revision {HEAD}: nothing to migrate", data)
    return 0


def cmd_daemon(args: argparse.Namespace, settings: Settings) -> int:
    from mountd.daemon import run_daemon

    from .metrics import enable, open_files

    settings.ensure_dirs()
    enable(settings)  # before the spares start: they inherit where to write
    open_files()  # mountd counts too (errors by kind)
    run_daemon(settings, open_registry(settings))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from .metrics import enable

    settings.ensure_dirs()
    enable(settings)  # before Celery forks its pool: each pool process writes files of its own
    from workers.app import app

    app.worker_main([
        "worker", "--queues", settings.queue, "--hostname", f"artifactfs@{settings.host}",
        "--concurrency", str(args.concurrency), "--task-events", "--loglevel", args.log_level.upper(),
        "--without-gossip", "--without-mingle",
    ])  # fmt: skip
    return 0


def cmd_serve_metrics(args: argparse.Namespace, settings: Settings) -> int:
    from .metrics import serve
    from .stack import METRICS_AUTH_ENV, configured_flower_auth, parse_flower_auth, stored_flower_auth

    handed = os.environ.pop(METRICS_AUTH_ENV, None)  # from `up`; gone before anything else runs
    if handed:
        auth = parse_flower_auth(handed, METRICS_AUTH_ENV, "run the service through artifactfs up")
    else:
        auth = configured_flower_auth(settings) or stored_flower_auth(settings)
    serve(settings, open_registry(settings), args.port, auth.user, auth.password, args.address)
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from .stack import Ports, up

    lines = up(settings, ports=Ports(args.flower_port, args.metrics_port), concurrency=args.concurrency)
    return said_lines(args, lines)


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from .stack import down

    return said_lines(args, down(settings, keep_mounts=args.keep_mounts))


def said_lines(args: argparse.Namespace, lines: Iterable[str]) -> int:
    """A line per step as it happens, or with --json one list of them at the end."""
    if not args.json:
        for line in lines:
            print(line, flush=True)
        return 0
    print(json.dumps({"steps": list(lines)}, indent=2))
    return 0


# --- parsing ---


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (argparse prints the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{PROG}: error: {printable(redact(message))} (see: {self.prog} --help)\n")


def port_option(p: argparse.ArgumentParser, flag: str, variable: str, default: int, what: str) -> None:
    # A string default goes through type=int too: a bad value of the variable is a usage error.
    p.add_argument(flag, type=int, default=os.environ.get(variable) or str(default),
                   help=f"{what} (default: ${variable} or {default})")  # fmt: skip


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
        p.add_argument("--json", action="store_true",
                       help="machine-readable output (for a service: its log, one JSON object per line)")  # fmt: skip
        return p

    def progress_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quiet", action="store_true", help="no progress on standard error")

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
    progress_options(p)
    p.add_argument("--filter", dest="blob_filter", metavar="FILTER",
                   help="partial-clone filter: blob:none (default: no file content arrives with the clone) or "
                        "blob:limit=SIZE (files smaller than SIZE, e.g. 64k, arrive with it, and their sizes)")
    p.add_argument("--require-commit", metavar="SHA",
                   help="verified source: preparation (and every refresh) fails unless the fetched ref contains "
                        "this commit (a full commit id)")
    p.add_argument("--depth", metavar="N",
                   help="a shallow clone of the N newest commits (blobless too); default: the whole history")
    p.add_argument("--refresh", metavar="INTERVAL",
                   help="fetch the ref again every INTERVAL (30, 90s, 5m, 1h, 1d) or never (the default); the "
                        "mount's commit moves on only while its working tree has no changes of its own")

    p = command("prepare", cmd_prepare, "prepare a repository again (after a failure, or to refresh it)")
    p.add_argument("--name", required=True)
    host_option(p, "the repository of HOST")
    p.add_argument("--wait", action="store_true",
                   help="return once the attempt has ended: 0 when ready, 1 when it failed")  # fmt: skip
    progress_options(p)

    p = command("list-repos", cmd_list_repos, "list registered repositories")
    hosts_options(p)

    p = command("status", cmd_status, "show state, head and hydration of repositories")
    p.add_argument("--name", help="only this repository")
    p.add_argument("--watch", action="store_true", help="follow changes live (each changed row again) until Ctrl-C")
    p.add_argument("--interval", type=positive_seconds, default=0.5, help="with --watch: seconds between looks (0.5)")
    hosts_options(p)

    p = command("remove-repo", cmd_remove_repo, "unmount a repository and delete its state")
    p.add_argument("--name", required=True)
    host_option(p, "the repository of HOST (its mountd unmounts it and deletes its state)")

    p = command("events", cmd_events, "show the event history of a repository")
    p.add_argument("--name", required=True)
    hosts_options(p)

    p = command("fsck", cmd_fsck, "check what the repository's git directory has, may fetch, and lost")
    p.add_argument("--name", required=True)
    p.add_argument("--fetch-missing", action="store_true",
                   help="first fetch, in one transaction, every object the shown commit lacks")  # fmt: skip

    p = command("prefetch", cmd_prefetch, "fetch in one transaction the objects an operation will read")
    p.add_argument("--name", required=True)
    p.add_argument("--paths", nargs="+", metavar="GLOB",
                   help="the files at the shown commit matching GLOB (* crosses /; a directory means all under it)")
    p.add_argument("--history", metavar="PATH", help="every version of PATH (what blame and log -p read)")
    p.add_argument("--max-count", type=int, metavar="K", help="with --history: the last K commits that changed PATH")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="both sides of every file changed between A and B")
    p.add_argument("--rev", metavar="REV", help="everything a checkout of REV reads")
    p.add_argument("--dry-run", action="store_true", help="print the plan, fetch nothing")

    command("migrate", cmd_migrate, "bring the registry's schema to this version's (artifactfs up runs it)")

    p = command("serve-metrics", cmd_serve_metrics,
                "serve this host's Prometheus metrics on 127.0.0.1 (artifactfs up runs it)")
    port_option(p, "--port", "ARTIFACTFS_METRICS_PORT", DEFAULT_METRICS_PORT, "the port to listen on")
    p.add_argument("--address", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")

    command("daemon", cmd_daemon, "run mountd: mount every registered repository until SIGTERM")

    p = command("worker", cmd_worker, "run a Celery worker for this host's prepare jobs")
    p.add_argument("--concurrency", type=int, default=2, help="prepare jobs run at once (default 2)")

    p = command("up", cmd_up, "start the embedded stack: redis-server, a worker, mountd and Flower")
    port_option(p, "--flower-port", "ARTIFACTFS_FLOWER_PORT", DEFAULT_FLOWER_PORT, "Flower's port on 127.0.0.1")
    port_option(p, "--metrics-port", "ARTIFACTFS_METRICS_PORT", DEFAULT_METRICS_PORT,
                "the Prometheus metrics endpoint's port on 127.0.0.1")  # fmt: skip
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


def report(message: str, code: int = FAILURE, *, as_json: bool = False) -> int:
    """An error as one line on stderr (with --json, one JSON object): secrets redacted, control
    characters escaped. Returns the exit code."""
    text = printable(redact(message))
    if as_json:
        print(json.dumps({"error": text, "exit_code": code}), file=sys.stderr)
    else:
        print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


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
    as_json = args.json  # every command takes --json
    try:
        settings = load_settings()
        # A service given --json logs in JSON; ARTIFACTFS_LOG_FORMAT=json makes every command do so.
        configure_logging(args.log_level, settings.host, fmt=LogFormat.JSON if as_json and args.command in SERVICES else None)
        # What we create (git dirs, the registry, logs, sockets) is root's alone unless the
        # settings share git dirs with the sandboxes' users.
        os.umask(settings.umask)
        return args.handler(args, settings)
    except ArtifactError as exc:
        return report(str(exc), as_json=as_json)
    except OSError as exc:
        return report(describe_os_error(exc), as_json=as_json)
    except KeyboardInterrupt:
        if as_json:
            return report("interrupted", INTERRUPTED, as_json=True)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # a bug: still one line; --log-level DEBUG shows where
        log.debug("unexpected error", exc_info=True)
        message = f"internal error: {type(exc).__name__}: {exc} (run with --log-level DEBUG for details)"
        return report(message, as_json=as_json)
    finally:
        while _opened:
            try:
                _opened.pop().close()
            except Exception:  # closing is tidying up: it must not hide the command's outcome
                pass


if __name__ == "__main__":
    sys.exit(main())
