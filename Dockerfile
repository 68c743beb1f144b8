# authz: Envoy ext_authz decision service (gRPC Check + grpc.health.v1 on 9000, metrics on 9464).
#
#   docker build -t authz:0.1.0 --build-arg VERSION=0.1.0 .
#   docker run --read-only -p 9000:9000 -p 9464:9464 \
#     -v "$PWD/config:/etc/authz:ro" authz:0.1.0 --config /etc/authz/config.yaml
#
# Needs BuildKit (the default builder since Docker 23) or podman/buildah for the RUN --mount
# lines. scripts/image/build.sh wraps this; README "Deploying" explains pushing.
#
# BASE_IMAGE: any Debian-like image whose `python3` is CPython 3.11+ with the venv module.
# The default is pinned to a patch release so a rebuild does not silently change Python; a
# digest pin (...:3.11.14-slim-bookworm@sha256:...) would also freeze the Debian packages,
# but it must be looked up from the registry you pull from, and then it needs a bot (Renovate,
# Dependabot) to bring in security updates, so it is left to the deploying registry/CI.
# Machines without registry access build on a local stand-in: scripts/image/base-image.sh.
# Fully qualified, because podman refuses short names unless registries.conf lists a search
# registry.
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: builds the project's wheel and installs it with its dependencies into a venv that
# the runtime stage copies whole. Only this stage reaches PyPI.
FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python3 -m venv /opt/authz

# .dockerignore admits only these (no tests, no venvs, no VCS data), so nothing else can leak
# into the wheel.
COPY pyproject.toml README.md ./
COPY authz/ authz/

# - The pip cache is a build cache mount: it speeds up rebuilds and never lands in a layer.
# - Optional secret `pip_ca`: a CA bundle for networks that intercept TLS to PyPI
#   (`--secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt`); absent, pip uses its own.
# - --only-binary for the dependencies: the runtime has no compiler and neither does this stage;
#   every dependency publishes manylinux wheels for CPython 3.11 on amd64 and arm64.
# - pip and setuptools are removed from the venv afterwards: the runtime never installs
#   anything, and they are the usual findings of image scanners.
# - Byte-code is compiled with unchecked hashes, so it stays valid whatever mtimes the COPY
#   into the runtime stage gives the sources, and Python never tries to write .pyc files to the
#   read-only root at run time.
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=pip_ca \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    /opt/authz/bin/pip wheel --no-deps --wheel-dir /wheels . ; \
    /opt/authz/bin/pip install --only-binary=:all: /wheels/authz-*.whl ; \
    /opt/authz/bin/pip uninstall --yes pip setuptools ; \
    /opt/authz/bin/python -m compileall -q -f --invalidation-mode unchecked-hash /opt/authz/lib

# ---------------------------------------------------------------------------------------------
# runtime: the base's Python plus the venv. No compiler, no pip, no caches, no tests.
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="authz" \
      org.opencontainers.image.description="Envoy ext_authz gRPC decision service: JWT verification and per-user token buckets for ML inference APIs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, non-root UID/GID (10001: above the ranges distributions hand out to system and
# login users, so it never maps to a host account) that a Kubernetes securityContext can name
# (runAsUser/runAsGroup/fsGroup). The passwd entry keeps libraries that look up the current
# user working; the account has no home and no login shell.
# (--no-log-init: a high UID would otherwise grow the sparse lastlog/faillog files.)
RUN groupadd --gid 10001 authz \
 && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin authz

COPY --from=builder /opt/authz /opt/authz

# Logs go to stdout/stderr unbuffered; nothing is written below /. The only scratch space is
# /tmp, declared a volume so it stays writable (an emptyDir or tmpfs) when the root filesystem
# is mounted read-only (readOnlyRootFilesystem: true, docker run --read-only).
ENV PATH=/opt/authz/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    HOME=/tmp
VOLUME ["/tmp"]

USER 10001:10001

# 9000: gRPC (envoy.service.auth.v3.Authorization/Check and grpc.health.v1.Health).
# 9464: Prometheus metrics over HTTP (/metrics).
EXPOSE 9000 9464

# Pass `--config FILE` as arguments (or set AUTHZ_CONFIG); SIGTERM drains and stops.
ENTRYPOINT ["authz", "serve"]
