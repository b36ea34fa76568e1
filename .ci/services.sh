#!/usr/bin/env bash
# The services the tests use for real, from Debian's packages: PostgreSQL (the tracking server's
# backend store) and Chromium (the MLflow UI test). Installed if missing, PostgreSQL started.
# Prints the environment the tests read; `.ci/run` evaluates it.
set -euo pipefail
missing=()
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/tmp/harness-apt.log 2>&1 || { cat /tmp/harness-apt.log >&2; exit 1; }
fi
version=$(ls /etc/postgresql | sort -n | tail -1)
pg_ctlcluster "$version" main start >/dev/null 2>&1 || true  # it may be running already
pg_ctlcluster "$version" main status >/dev/null
# A login for the tests, able to create the databases they throw away.
su postgres -c "psql -q -tc \"SELECT 1 FROM pg_roles WHERE rolname = 'harness'\"" | grep -q 1 \
    || su postgres -c "psql -q -c \"CREATE ROLE harness LOGIN CREATEDB PASSWORD 'harness'\"" >&2
echo "export HARNESS_TEST_POSTGRES=postgresql://harness:harness@127.0.0.1:5432/postgres"
echo "export HARNESS_TEST_CHROMIUM=$(command -v chromium)"
