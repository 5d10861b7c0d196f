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
    )
