#!/usr/bin/env bash
# Installs what the test suite talks to that is not part of the Rust build: the Debian `age` CLI
# (interop test), psql/pg_dump (PostgreSQL suite), dcmtk (echoscu/storescu/findscu), the test
# OpenID provider (npm) and the Python clients (.venv). Idempotent; quiet when all is present.
set -euo pipefail

missing=()
command -v age >/dev/null 2>&1 || missing+=(age)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v pg_dump >/dev/null 2>&1 || missing+=(postgresql-client)
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing test dependencies: ${missing[*]}"
  sudo_prefix=""
  [ "$(id -u)" -eq 0 ] || sudo_prefix="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_prefix apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
    $sudo_prefix apt-get update -q >/dev/null
    $sudo_prefix apt-get install -y -q "${missing[@]}" >/dev/null
  }
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "note: cargo-nextest not found; scripts/test falls back to cargo test"
fi

# The test OpenID provider (npm `oidc-provider`, run with the machine's Node.js).
idp_dir="$(dirname "$0")/../tests/idp"
if [ ! -d "$idp_dir/node_modules/oidc-provider" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "installing the test OpenID provider (npm ci in tests/idp)"
    npm ci --prefix "$idp_dir" --no-audit --no-fund --loglevel=error >/dev/null
  else
    echo "note: npm not found; the OpenID provider tests will fail (install nodejs and npm)"
  fi
fi

# Python clients (fhirclient, fhirpy, PyJWT, pydicom, pynetdicom, dicomweb-client) in the
# project's own virtual environment.
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$root/.venv/bin/python" ] || ! "$root/.venv/bin/python" -c "import fhirclient, fhirpy, jwt, pydicom, pydicom_data, pynetdicom, dicomweb_client" >/dev/null 2>&1; then
  echo "installing the Python test clients into .venv"
  python3 -m venv "$root/.venv"
  "$root/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/python/requirements.txt"
fi
