# sidecar: reverse proxy for OpenAI-compatible model servers.
#   docker build -t sidecar .
#   docker run --network host -v sidecar-data:/data sidecar serve --upstream http://127.0.0.1:8000/v1
# Every stage uses BASE_IMAGE, so a mirrored or locally built Python 3.11 image can stand in for the default.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# Wheels for the sidecar, its tracing extra and every dependency; the final stage installs them offline, pinned
# to this build's version by the requirements file written here.
RUN python3 -m pip wheel --no-cache-dir --wheel-dir /wheels ".[otel]" \
    && python3 -c "import sidecar; print(f'sidecar[otel]=={sidecar.__version__}')" > /wheels/requirements.txt

FROM ${BASE_IMAGE}
ARG UID=10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_SERVER_HOST=0.0.0.0 \
    SIDECAR_SERVER_PORT=8080 \
    SIDECAR_SERVER_DATA_DIR=/data \
    SIDECAR_STORE_URL=sqlite:////data/sidecar.db
COPY --from=build /wheels /wheels
RUN python3 -m pip install --no-cache-dir --no-index --find-links=/wheels --requirement /wheels/requirements.txt \
    && rm -rf /wheels \
    && mkdir -p /data \
    && chown "${UID}:${UID}" /data
USER ${UID}:${UID}
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["sidecar"]
CMD ["serve"]
