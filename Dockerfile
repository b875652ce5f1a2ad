# syntax=docker/dockerfile:1
#
# One image for every gengui process; the subcommand picks which:
#   docker run IMAGE api | consumers | reconciler | worker | migrate | users create EMAIL
#
# Why an editable install: `core/migrations.py` finds the Alembic scripts at
# `Path(core.__file__).parent.parent / "migrations"`, and `migrations/` is not a Python
# package, so a plain `pip install .` would put `core` in site-packages with no
# `migrations/` next to it and `gengui migrate` would fail. Installing with `pip install -e .`
# from /app keeps `core` (and consumers, providers, reconciler) importing from /app, where
# `/app/migrations` sits beside them. The source is copied, not mounted, so the image is
# still self-contained; /app is owned by root and read-only to the runtime user.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtualenv with the dependencies and the project ----
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /app

# Dependencies first, read from pyproject.toml alone, so that editing the source does not
# reinstall them. Every dependency ships manylinux wheels: no compiler needed.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the project itself (see the note at the top for why it is editable).
COPY . .
RUN pip install --no-deps -e . \
    && python -m compileall -q core consumers providers reconciler migrations \
    && gengui --help > /dev/null

# ---- runtime: the same paths, a non-root user ----
FROM ${PYTHON_IMAGE}

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GENGUI_DATA_DIR=/data

# /data is GENGUI_DATA_DIR: the only place gengui writes (local images, the embedded
# servers of `gengui dev`). Compose deployments use S3 and external servers instead.
RUN groupadd --system --gid 10001 gengui \
    && useradd --system --uid 10001 --gid gengui --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin gengui \
    && install -d -o gengui -g gengui -m 0750 /data

# The editable install records absolute paths (/opt/venv, /app): copy both unchanged.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

WORKDIR /app
USER gengui:gengui
EXPOSE 8000

ENTRYPOINT ["gengui"]
CMD ["api"]
