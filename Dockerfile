# syntax=docker/dockerfile:1
# One image for every Fintide process; the command picks the role
# (fintide api | worker | feed | migrate). See docs/DEPLOY.md.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A venv turns the whole install into one directory to copy into the runtime stage.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer: they change far less often than the code.
# With only pyproject.toml present the package itself is empty, so drop it again.
COPY pyproject.toml ./
RUN pip install . && pip uninstall -y fintide
COPY . .
RUN pip install --no-deps .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FINTIDE_DATA_DIR=/data \
    FINTIDE_API_HOST=0.0.0.0 \
    FINTIDE_API_PORT=8000 \
    FINTIDE_WORKER_WEB_PORT=6066 \
    NUMBA_CACHE_DIR=/data/numba-cache
# NUMBA_CACHE_DIR: the installed sources are read-only for the app user, so Numba's
# compiled-kernel cache goes to the writable data dir.
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home fintide \
    && install -d -o fintide -g fintide /data
COPY --from=build /opt/venv /opt/venv
USER fintide
WORKDIR /data
# RocksDB tables, logs and caches. A volume per container: workers never share state.
VOLUME ["/data"]
# 8000: api (REST, WebSocket, /metrics). 6066: worker's Faust web (tables, /metrics).
EXPOSE 8000 6066
CMD ["fintide", "api"]
