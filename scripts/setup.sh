#!/usr/bin/env bash
# Idempotent install step shared by `make demo`, `make test` and `make bench`:
# Debian packages that are missing, then a virtual environment with the project.
set -euo pipefail
venv=${1:-.venv}

# postgresql: the tests run the fleet registry against a real, throwaway PostgreSQL server;
# procps: the tests find worker processes with pgrep;
# docker-compose: the tests validate compose.yaml with it (no Docker engine needed).
apt_packages=(fuse3 libfuse3-dev pkg-config git redis-server postgresql procps python3-venv gcc python3-dev docker-compose)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# python3-venv and python3-dev are what Debian's own interpreter needs to build pyfuse3 in a venv.
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]} (run as root, or install them with apt-get)" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e '.[test]'
# An editable install leaves the bytecode to the first run, which PYTHONDONTWRITEBYTECODE forbids:
# every command would compile the package again (a tenth of a second of each CLI call).
"$venv/bin/python" -m compileall -q artifactfs workers mountd >/dev/null
echo "setup: ready ($("$venv/bin/python" --version), $(git --version))"
