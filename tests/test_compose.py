"""compose.yaml and the Dockerfile: what the containerised stack promises.

Checked without a Docker engine: Debian's docker-compose (installed by scripts/setup.sh) validates
the file against the Compose schema, resolves its variables and prints the configuration it would
run; the tests read that configuration, not the YAML as written. The health checks that run
project code are run here too, against this checkout.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from artifactfs.procs import write_pid_file

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"

PG_PASSWORD = "pg-Secret-4711"
FLOWER_AUTH = "watcher:flower-Secret-0815"
REDIS_PASSWORD = "redis-Secret-2342"
REQUIRED = {"ARTIFACTFS_PG_PASSWORD": PG_PASSWORD, "ARTIFACTFS_FLOWER_AUTH": FLOWER_AUTH,
            "ARTIFACTFS_REDIS_PASSWORD": REDIS_PASSWORD}

STATE_ROOT = "/var/lib/artifactfs"
IMAGE_SERVICES = ("migrate", "worker", "mountd", "flower", "metrics")  # built from the Dockerfile
LONG_RUNNING = ("redis", "postgres", "worker", "mountd", "flower", "metrics")


def compose_tool() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose is not installed: it validates compose.yaml "
                    "(run `make setup`, or apt-get install docker-compose)")  # fmt: skip
    return found


def compose_env(**overrides: str | None) -> dict[str, str]:
    """This environment without the stack's own variables, then the required ones and `overrides`
    (None unsets one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARTIFACTFS_", "FLOWER_", "COMPOSE_"))}
    env.update(REQUIRED)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_compose(*args: str, **overrides: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [compose_tool(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "config", *args],
        cwd=ROOT, env=compose_env(**overrides), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def yaml_to_data(text: str) -> Any:
    """Parse YAML with PyYAML: this interpreter's if it has it, else the one docker-compose runs
    on (which always has it: docker-compose is built on it)."""
    try:
        import yaml
    except ModuleNotFoundError:
        pass
    else:
        return yaml.safe_load(text)
    shebang = Path(compose_tool()).read_text(errors="replace").splitlines()[0]
    assert shebang.startswith("#!"), f"docker-compose is not a script ({shebang!r}): no PyYAML to read its output"
    interpreter = shebang[2:].split()
    done = subprocess.run(
        [*interpreter, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=text, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def rendered(**overrides: str | None) -> dict[str, Any]:
    done = run_compose(**overrides)
    assert done.returncode == 0, f"docker-compose config failed: {done.stderr}"
    return yaml_to_data(done.stdout)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return rendered()


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["services"]


def words(value: Any) -> list[str]:
    """A command, entrypoint or health check test as a list of words (a string is one shell line)."""
    if value is None:
        return []
    return value.split() if isinstance(value, str) else [str(v) for v in value]


def health_test(service: dict[str, Any]) -> list[str]:
    return words(service.get("healthcheck", {}).get("test"))


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """The service's volumes in long form, whichever form the configuration uses."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *_ = volume.split(":") + [""]
            found.append({"source": source, "target": target})
        else:
            found.append(volume)
    return found


# --- the file is valid, and refused without its secrets ---


def test_compose_validates() -> None:
    done = run_compose("-q")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no warnings either


@pytest.mark.parametrize("variable", sorted(REQUIRED))
def test_refused_without_a_required_secret(variable: str) -> None:
    for value in (None, ""):
        done = run_compose("-q", **{variable: value})
        assert done.returncode != 0, f"compose.yaml is accepted with {variable}={value!r}"
        assert variable in done.stderr, done.stderr


def test_the_stack_has_its_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"redis", "postgres", "migrate", "worker", "mountd", "flower", "metrics"}


# --- each service keeps its promise ---


def test_redis_keeps_jobs(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(words(redis["command"]))
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(m["target"] == "/data" and m["source"] for m in mounts(redis)), "the append-only file needs a volume"
    assert "redis-cli ping" in " ".join(health_test(redis))
    # Every client authenticates; the password reaches redis-server through a file, never argv.
    assert redis["environment"]["REDISCLI_AUTH"] == REDIS_PASSWORD
    assert "requirepass" in command and "$REDISCLI_AUTH" in command and REDIS_PASSWORD not in command
    assert "ports" not in redis


def test_postgres_holds_the_registry(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:15")
    assert postgres["environment"]["POSTGRES_PASSWORD"] == PG_PASSWORD
    assert postgres["environment"]["POSTGRES_USER"] == "artifactfs"
    assert postgres["environment"]["POSTGRES_DB"] == "artifactfs"
    assert any(m["target"] == "/var/lib/postgresql/data" and m["source"] for m in mounts(postgres))
    assert "pg_isready" in " ".join(health_test(postgres))
    assert "ports" not in postgres


def test_artifactfs_services_share_the_environment(services: dict[str, dict[str, Any]]) -> None:
    expected = {
        "ARTIFACTFS_DATABASE_URL": f"postgresql+psycopg://artifactfs:{PG_PASSWORD}@postgres:5432/artifactfs",
        "ARTIFACTFS_REDIS_URL": f"redis://:{REDIS_PASSWORD}@redis:6379/0",
        "ARTIFACTFS_HOST": "compose",
        "ARTIFACTFS_ROOT": STATE_ROOT,
    }
    for name in ("migrate", "worker", "mountd", "metrics"):
        env = services[name]["environment"]
        assert {key: env.get(key) for key in expected} == expected, name
        assert any(m["target"] == STATE_ROOT and m["source"] == "state" for m in mounts(services[name])), name


def test_the_host_name_is_configurable() -> None:
    services = rendered(ARTIFACTFS_HOST="builder-7")["services"]
    for name in ("migrate", "worker", "mountd", "flower", "metrics"):
        assert services[name]["environment"]["ARTIFACTFS_HOST"] == "builder-7", name


def test_worker_and_mountd_wait_for_a_migrated_registry(services: dict[str, dict[str, Any]]) -> None:
    assert words(services["migrate"]["command"])[-1] == "migrate"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "mountd", "metrics"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert words(worker["command"])[-1] == "worker"
    test = " ".join(health_test(worker))
    assert "inspect ping" in test
    assert re.search(r"artifactfs@\$\$?ARTIFACTFS_HOST\b", test), test  # this host's worker, by name


def test_mountd_can_mount_and_share_its_mounts(services: dict[str, dict[str, Any]]) -> None:
    mountd = services["mountd"]
    assert words(mountd["command"])[-1] == "daemon"
    assert any(str(d).split(":")[0] == "/dev/fuse" for d in mountd["devices"])
    assert "SYS_ADMIN" in mountd["cap_add"]
    assert "apparmor:unconfined" in mountd["security_opt"]
    assert not mountd.get("privileged"), "the device and one capability, not every privilege"
    shared = [m for m in mounts(mountd) if m.get("type") == "bind" and m["target"] == f"{STATE_ROOT}/mnt"]
    assert len(shared) == 1, mounts(mountd)
    assert shared[0]["bind"]["propagation"] == "rshared"
    assert shared[0]["source"] == f"{STATE_ROOT}/mnt"
    assert "running_pid" in " ".join(health_test(mountd))


@pytest.mark.parametrize(("name", "variable", "path"), [
    ("flower", "FLOWER_BASIC_AUTH", "/"),
    ("metrics", "ARTIFACTFS_METRICS_BASIC_AUTH", "/metrics"),
])  # fmt: skip
def test_web_services_ask_for_a_password_and_stay_on_loopback(services: dict[str, dict[str, Any]], name: str,
                                                              variable: str, path: str) -> None:  # fmt: skip
    service = services[name]
    env = service["environment"]
    assert env[variable] == FLOWER_AUTH
    assert service["ports"], f"{name} is published on the host"
    (port,) = service["ports"]
    host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
    target = port["target"] if isinstance(port, dict) else str(port).rsplit(":", 1)[1].split("/")[0]
    assert host_ip == "127.0.0.1", port
    # Healthy only when it answers with the credential and refuses without (artifactfs/health.py).
    assert health_test(service) == ["CMD", "python", "-m", "artifactfs.health", f"http://127.0.0.1:{target}{path}", variable]


def test_flower_runs_flower_on_the_broker_alone(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    argv = words(flower.get("entrypoint")) + words(flower["command"])
    assert argv[:3] == ["celery", "-A", "workers.app"] and "flower" in argv
    assert flower["environment"].get("FLOWER_UNAUTHENTICATED_API", "false") == "false"
    assert "ARTIFACTFS_DATABASE_URL" not in flower["environment"], "Flower needs the broker alone"
    assert words(services["metrics"]["command"])[-3:] == ["serve-metrics", "--address=0.0.0.0", "--port=9464"]


def test_every_long_running_service_is_checked_and_restarted(services: dict[str, dict[str, Any]]) -> None:
    for name in LONG_RUNNING:
        assert health_test(services[name])[:1] in (["CMD"], ["CMD-SHELL"]), name
        assert services[name]["restart"] == "unless-stopped", name
    assert services["migrate"]["restart"] == "no", "the migration runs once"


def test_artifactfs_services_are_built_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    images = set()
    for name in IMAGE_SERVICES:
        build = services[name]["build"]
        context = Path(build["context"] if isinstance(build, dict) else build)
        assert context.resolve() == ROOT, name
        dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
        assert (context / dockerfile).resolve() == DOCKERFILE, name
        images.add(services[name]["image"])
    assert len(images) == 1, images


def test_secrets_never_reach_a_command_line(services: dict[str, dict[str, Any]]) -> None:
    password = FLOWER_AUTH.partition(":")[2]
    for name, service in services.items():
        argv = " ".join(words(service.get("entrypoint")) + words(service.get("command")) + health_test(service))
        for secret in (PG_PASSWORD, password, REDIS_PASSWORD):
            assert secret not in argv, name
        assert "ARTIFACTFS_FLOWER_AUTH" not in service.get("environment", {}), name


# --- health checks that run project code ---


def health_script(services: dict[str, dict[str, Any]], name: str) -> str:
    test = health_test(services[name])
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


def test_health_scripts_compile(services: dict[str, dict[str, Any]]) -> None:
    compile(health_script(services, "mountd"), "<mountd health check>", "exec")


@pytest.fixture
def fake_mountd() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line reads like mountd's (`.../artifactfs daemon`)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "artifactfs", "daemon"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def run_health(script: str, root: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARTIFACTFS_")}
    env["ARTIFACTFS_ROOT"] = str(root)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_mountd_health_check(services: dict[str, dict[str, Any]], tmp_path: Path,
                             fake_mountd: subprocess.Popen[bytes]) -> None:  # fmt: skip
    script = health_script(services, "mountd")
    (tmp_path / "run").mkdir()
    pid_file = tmp_path / "run" / "mountd.pid"

    done = run_health(script, tmp_path)
    assert (done.returncode, done.stderr) == (1, ""), "unhealthy without a pid file"

    write_pid_file(pid_file, fake_mountd.pid)
    done = run_health(script, tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), "healthy while the pid file names a running mountd"

    write_pid_file(pid_file, os.getpid())  # a live process, but not mountd
    done = run_health(script, tmp_path)
    assert (done.returncode, done.stderr) == (1, ""), "unhealthy when the pid file names another program"


# --- the image ---


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    found = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            found.append((instruction.upper(), args.strip()))
    return found


def test_dockerfile_builds_the_project() -> None:
    assert DOCKERFILE.is_file()
    steps = dockerfile_instructions()
    bases = [args.split()[0] for instruction, args in steps if instruction == "FROM"]
    assert bases and all(base.startswith("python:3.11-") and "bookworm" in base for base in bases), bases
    runs = " ".join(args for instruction, args in steps if instruction == "RUN")
    for package in ("libfuse3-dev", "pkg-config", "gcc", "fuse3", "git"):
        assert re.search(rf"apt-get install[^&]*\s{re.escape(package)}(\s|$)", runs), package
    assert "pip install '.[postgres]'" in runs
    entrypoints = [args for instruction, args in steps if instruction == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["artifactfs"]


def test_dockerfile_installs_dependencies_before_copying_the_source() -> None:
    steps = dockerfile_instructions()
    order = [(i, args) for i, args in steps if i in ("COPY", "RUN")]
    copy_all = next(n for n, (i, args) in enumerate(order) if i == "COPY" and args.split()[0] == ".")
    requirements = next(n for n, (i, args) in enumerate(order) if i == "RUN" and "pip install -r" in args)
    manifest = next(n for n, (i, args) in enumerate(order) if i == "COPY" and args.split()[0] == "pyproject.toml")
    assert manifest < requirements < copy_all


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}  # fmt: skip
    for pattern in (".venv", ".git", "**/__pycache__", "**/*.egg-info", "build"):
        assert pattern in ignored, pattern
    # What the build needs must stay in the context.
    for needed in ("pyproject.toml", "README.md", "artifactfs", "workers", "mountd"):
        assert needed not in ignored, needed
