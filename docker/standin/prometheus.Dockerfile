# Prometheus stand-in for docker/compose.local.yaml: Debian's prometheus
# (2.42) on the local base image (scripts/make_base_image.sh), for hosts that
# cannot pull prom/prometheus. Same entrypoint, paths and user-facing flags as
# the official image; wget for the compose healthcheck.
ARG BASE_IMAGE=local/debian-python:bookworm
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown prometheus:prometheus /prometheus

USER prometheus
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
