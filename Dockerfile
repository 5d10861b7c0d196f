# The artifactfs image: the CLI, the worker, mountd and Flower (compose.yaml runs each of them).
# pyfuse3 is built from source against libfuse3, in a stage of its own; the image itself holds the
# virtual environment, FUSE's runtime and git, no compiler.

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libfuse3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/artifactfs
ENV PATH=/opt/artifactfs/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change to the source rebuilds only the
# layers below.
COPY pyproject.toml ./
RUN python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(project['dependencies'] + project['optional-dependencies']['postgres']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY . .
RUN pip install '.[postgres]'

FROM python:3.11-slim-bookworm
# fuse3: libfuse3 for pyfuse3 and fusermount3 for unmounting; git and ssh for the remotes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 git openssh-client ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/artifactfs /opt/artifactfs
ENV PATH=/opt/artifactfs/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Services start in an empty directory of root's: `python -m` and Celery put the working
# directory on sys.path, and Flower reads ./flowerconfig.py.
RUN install -d -m 0755 /srv/artifactfs
WORKDIR /srv/artifactfs
ENTRYPOINT ["artifactfs"]
CMD ["--help"]
