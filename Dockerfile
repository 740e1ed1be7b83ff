# LLMasOS server image: multi-stage (build a virtualenv, copy it into a slim runtime), non-root, models in a volume.
#   docker build -t llmasos .                                   # CPU torch (default)
#   docker build -t llmasos:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/llmasos
ENV PATH=/opt/llmasos/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --index-url "$TORCH_INDEX" torch
COPY pyproject.toml README.md /src/
COPY llmasos /src/llmasos
RUN pip install /src

FROM python:${PYTHON_VERSION}-slim
RUN useradd --create-home --uid 10001 llmasos && mkdir /data && chown llmasos /data
COPY --from=build /opt/llmasos /opt/llmasos
# LLMASOS_HOME holds the model store (and the SQLite database when LLMASOS_DATABASE_URL is unset).
ENV PATH=/opt/llmasos/bin:$PATH LLMASOS_HOME=/data PYTHONUNBUFFERED=1
VOLUME /data
USER llmasos
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
# Stop with SIGTERM: the server drains for --shutdown-timeout (30 s) before exiting.
STOPSIGNAL SIGTERM
ENTRYPOINT ["llmasos"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
