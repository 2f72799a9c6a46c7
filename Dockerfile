# edgeroute: the Rust core is built once (stage `build`, into an abi3 wheel); the runtime
# image has Python and the wheel only, runs as a non-root user and checks /readyz.
#   docker build -t edgeroute .
#   docker run -p 8080:8080 -v $PWD/edgeroute.yaml:/etc/edgeroute/edgeroute.yaml:ro \
#     -v edgeroute-data:/var/lib/edgeroute edgeroute
# /etc/edgeroute is read-only here: the config must put its ledger in the data volume,
# `ledger: {path: /var/lib/edgeroute/edgeroute-ledger.db}` (its default is beside the config).
# deploy/build-image-steps.sh runs the same steps without Docker (CI checks them that way).

FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH
RUN pip install --no-cache-dir "maturin>=1.7,<2"
WORKDIR /src
COPY Cargo.toml Cargo.lock pyproject.toml README.md LICENSE ./
COPY rust rust
COPY edgeroute edgeroute
RUN maturin build --release --out /wheels

FROM python:3.11-slim AS runtime
RUN useradd --system --uid 10001 --home-dir /var/lib/edgeroute --create-home edgeroute
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /var/lib/edgeroute
ENV EDGEROUTE_CONFIG=/etc/edgeroute/edgeroute.yaml \
    EDGEROUTE_HOST=0.0.0.0 \
    EDGEROUTE_PORT=8080 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['EDGEROUTE_PORT'] + '/readyz', timeout=2)"]
ENTRYPOINT ["edgeroute"]
CMD ["serve"]
