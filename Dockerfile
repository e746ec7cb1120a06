# grantkeeper image: one image for the Celery worker, Celery beat and the `grantkeeper` CLI
# (migrations run as `grantkeeper db upgrade`). See docker-compose.yml for how it is run.
#
# Build: docker build -t grantkeeper:local .    (or: docker compose build)
#
# No secret is baked in: settings come from the environment at run time, secrets from files
# that docker/entrypoint.sh turns into GRANTKEEPER_* variables.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: dependencies from the hash-pinned lock, then the project itself ---------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

COPY pyproject.toml README.md ./
COPY grantkeeper/ grantkeeper/
COPY config/ config/
COPY worker/ worker/
COPY tasks/ tasks/
# The project only (its dependencies are all in the lock); setuptools comes from build isolation.
RUN pip install --no-deps .

# -- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# A fixed uid/gid, so compose's `user: "10001:10001"` and file ownership on hosts match.
RUN groupadd --gid 10001 grantkeeper \
    && useradd --uid 10001 --gid grantkeeper --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin grantkeeper

COPY --from=build /opt/venv /opt/venv

# The source tree lives in /app and comes first on sys.path (PYTHONPATH): the installed wheel
# provides the `grantkeeper` console script and metadata, but does not contain migrations/,
# which grantkeeper.db finds next to the grantkeeper package (../migrations). Everything under
# /app is owned by root and read-only for the service user; nothing in it needs writing
# (PostgreSQL is the store, so the SQLite data_dir is unused), so the container can run with a
# read-only root filesystem.
WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY grantkeeper/ grantkeeper/
COPY config/ config/
COPY worker/ worker/
COPY tasks/ tasks/
COPY migrations/ migrations/
COPY docker/entrypoint.sh /usr/local/bin/grantkeeper-entrypoint
RUN chmod 0755 /usr/local/bin/grantkeeper-entrypoint \
    && python -m compileall -q /app/grantkeeper /app/config /app/worker /app/tasks /app/migrations

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001

ENTRYPOINT ["/usr/local/bin/grantkeeper-entrypoint"]
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
