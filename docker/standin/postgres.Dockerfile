# PostgreSQL stand-in for docker/compose.local.yaml: Debian's postgresql-15 on
# the local base image (scripts/make_base_image.sh), for hosts that cannot
# pull postgres:16-alpine. It honours what the compose file asks of the
# official image: POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB on first
# start, data in /var/lib/postgresql/data, pg_isready for the healthcheck; and
# PGPORT (default 5432), since with host networking the port is the host's.
ARG BASE_IMAGE=local/debian-python:bookworm
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# postgresql-common first, told not to create a cluster of its own
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-common \
    && sed -ri 's/#?(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    PGPORT=5432
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER postgres
# fast shutdown: end sessions, checkpoint, exit (the official image does the same)
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
