"""Settings from the environment, with embedded defaults that work for one host out of the box."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


def _default_root() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/artifactfs")
    return Path.home() / ".local" / "share" / "artifactfs"


@dataclass(frozen=True)
class Settings:
    root: Path
    database_url: str
    mount_root: Path
    redis_url: str | None
    host: str
    prepare_deadline: float = 1800.0  # seconds after which a preparing attempt is failed
    job_soft_limit: float = 1500.0  # a prepare job's soft and hard time limits, both under
    job_hard_limit: float = 1700.0  # the broker's visibility timeout
    visibility_timeout: float = 1800.0
    job_retries: int = 5  # transient git failures retried with exponential backoff
    placeholder_wait: float = 2.0  # how long add-repo --async waits for mountd's placeholder

    @property
    def git_root(self) -> Path:
        return self.root / "git"

    @property
    def tmp_root(self) -> Path:
        return self.root / "tmp"

    @property
    def lock_root(self) -> Path:
        return self.root / "locks"

    @property
    def run_root(self) -> Path:
        return self.root / "run"

    @property
    def state_root(self) -> Path:
        """Per-repository state that is not git's: hydration statistics, later the overlay."""
        return self.root / "state"

    @property
    def embedded_redis_socket(self) -> Path:
        return self.run_root / "redis.sock"

    @property
    def wakeup_url(self) -> str:
        """Redis for wake-ups and the job broker: ARTIFACTFS_REDIS_URL, else the embedded one."""
        return self.redis_url or f"unix://{self.embedded_redis_socket}"

    @property
    def queue(self) -> str:
        """This host's job queue: a clone must land on the host whose mountd mounts it."""
        return f"artifactfs.{self.host}"

    @property
    def credential_root(self) -> Path:
        return self.root / "credentials"

    def git_dir(self, name: str) -> Path:
        return self.git_root / f"{name}.git"

    def credential_file(self, name: str) -> Path:
        return self.credential_root / name

    def repo_state_dir(self, name: str) -> Path:
        return self.state_root / name

    def stats_file(self, name: str) -> Path:
        return self.repo_state_dir(name) / "fetch-stats.json"

    def lock_file(self, name: str) -> Path:
        return self.lock_root / f"{name}.lock"

    def mount_path(self, name: str, mount_root: Path | None = None) -> Path:
        return (mount_root or self.mount_root) / name

    def ensure_dirs(self) -> None:
        for path in (self.root, self.git_root, self.tmp_root, self.lock_root, self.run_root, self.state_root):
            path.mkdir(parents=True, exist_ok=True)
        self.credential_root.mkdir(mode=0o700, exist_ok=True)


def load_settings() -> Settings:
    root = Path(os.environ.get("ARTIFACTFS_ROOT") or _default_root()).expanduser().absolute()
    database_url = os.environ.get("ARTIFACTFS_DATABASE_URL") or f"sqlite:///{root / 'registry.db'}"
    mount_root = Path(os.environ.get("ARTIFACTFS_MOUNT_ROOT") or root / "mnt").expanduser().absolute()
    return Settings(
        root=root,
        database_url=database_url,
        mount_root=mount_root,
        redis_url=os.environ.get("ARTIFACTFS_REDIS_URL") or None,
        host=os.environ.get("ARTIFACTFS_HOST") or socket.gethostname(),
        prepare_deadline=float(os.environ.get("ARTIFACTFS_PREPARE_DEADLINE") or 1800),
        job_soft_limit=float(os.environ.get("ARTIFACTFS_JOB_SOFT_LIMIT") or 1500),
        job_hard_limit=float(os.environ.get("ARTIFACTFS_JOB_HARD_LIMIT") or 1700),
        visibility_timeout=float(os.environ.get("ARTIFACTFS_VISIBILITY_TIMEOUT") or 1800),
        job_retries=int(os.environ.get("ARTIFACTFS_JOB_RETRIES") or 5),
        placeholder_wait=float(os.environ.get("ARTIFACTFS_PLACEHOLDER_WAIT") or 2.0),
    )
