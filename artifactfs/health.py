"""The health check of a web service behind basic auth (compose.yaml's Flower and metrics):
healthy when it answers with the credential and refuses without it, so that a service which
came up without its password counts as broken, not as up.

    python -m artifactfs.health URL VARIABLE   # VARIABLE names the environment's user:password
"""
from __future__ import annotations

import base64
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

TIMEOUT_SECONDS = 5.0


def status(url: str, credential: str | None) -> int:
    request = urllib.request.Request(url)
    if credential is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(credential.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def guarded(url: str, credential: str) -> bool:
    """Serving to the holder of `credential`, and to nobody else."""
    try:
        return status(url, credential) == 200 and status(url, None) == 401
    except OSError:  # refused, timed out: not serving
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or not os.environ.get(args[1]):
        print("usage: python -m artifactfs.health URL VARIABLE (VARIABLE holding user:password)", file=sys.stderr)
        return 2
    return 0 if guarded(args[0], os.environ[args[1]]) else 1


if __name__ == "__main__":
    sys.exit(main())
