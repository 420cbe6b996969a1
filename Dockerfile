# syntax=docker/dockerfile:1.7
# Stages: `runtime` (the default, lean production image) and `test` (runtime plus the dev
# dependencies and the test suite; the compose stack builds this one so that
# `docker compose run --rm api pytest -q` works).

# The Python minor version that mypy and CI check (pyproject's python_version).
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /app

FROM base AS builder
RUN pip install --no-cache-dir "uv==0.13.9"
# Dependencies first, in their own cached layer: source edits do not reinstall them.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-install-project --no-dev --no-group bench
COPY src ./src
COPY alembic ./alembic
COPY alembic.ini ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-group bench --no-editable

FROM builder AS builder-test
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-group bench --no-editable

FROM base AS runtime-base
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app \
    && chown app:app /app
ENV PATH=/opt/venv/bin:$PATH
# `alembic upgrade head` (the migrate service) runs from /app with these.
COPY --chown=app:app alembic ./alembic
COPY --chown=app:app alembic.ini ./
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
CMD ["crypto-client", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime-base AS test
COPY --from=builder-test /opt/venv /opt/venv
# The suite, and the files its static checks read.
COPY --chown=app:app pyproject.toml README.md Dockerfile docker-compose.yml .env.example .dockerignore .gitignore ./
COPY --chown=app:app tests ./tests
COPY --chown=app:app bench ./bench
COPY --chown=app:app deploy ./deploy
USER app

FROM runtime-base AS runtime
COPY --from=builder /opt/venv /opt/venv
USER app
