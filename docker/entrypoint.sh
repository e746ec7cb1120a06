#!/bin/sh
# grantkeeper container entrypoint: turns secret files into GRANTKEEPER_* settings, then runs
# the command (`exec "$@"`), so the command is PID 1 (under `init: true`, tini's only child).
#
# Secrets are read from files (compose `secrets:` mounts them under /run/secrets), never from
# the image or the compose file. The settings built from them exist only in this process's
# environment: `docker inspect` shows the non-secret inputs below, not the results.
#
#   GRANTKEEPER_DATABASE_URL     from PGHOST [PGPORT] PGDATABASE PGUSER + secret postgres_password
#   GRANTKEEPER_REDIS_URL        from REDIS_HOST [REDIS_PORT] [REDIS_DB] [REDIS_TLS] + secrets
#                                redis_password and (with TLS) redis_ca. REDIS_TLS=yes (the
#                                default) builds rediss://...?ssl_cert_reqs=required&ssl_ca_certs=
#                                <secrets dir>/redis_ca: the server certificate must be signed by
#                                that CA and name REDIS_HOST. REDIS_TLS=no builds redis:// (plain
#                                TCP: only for a Redis the network itself protects)
#   GRANTKEEPER_ENCRYPTION_KEYS  from secret encryption_keys: one KEY_ID:KEY per line (or
#                                comma-separated), primary first; blank lines and '#' comments
#                                are ignored
#
# A setting already present in the environment is left alone. The inputs deliberately do not
# start with GRANTKEEPER_: grantkeeper rejects unknown GRANTKEEPER_* variables at start-up.
# Passwords are percent-encoded into the URLs, so any characters work (hex is simplest).
set -eu

secrets_dir="${GK_SECRETS_DIR:-/run/secrets}"

die() {
    printf 'grantkeeper-entrypoint: %s\n' "$*" >&2
    exit 78 # EX_CONFIG
}

# The content of secret $1 without trailing newlines; dies if it is missing or empty.
read_secret() {
    secret_file="$secrets_dir/$1"
    [ -r "$secret_file" ] || die "secret '$1' is not readable at $secret_file as uid $(id -u)" \
        "(create secrets/$1 and make it readable by that uid: see docker-compose.yml)"
    secret_value=$(cat "$secret_file")
    [ -n "$secret_value" ] || die "secret '$1' ($secret_file) is empty"
    printf '%s' "$secret_value"
}

# Percent-encodes stdin for use as a URL user or password (python: always in this image).
urlencode() {
    python3 -c 'import sys, urllib.parse; sys.stdout.write(urllib.parse.quote(sys.stdin.read(), safe=""))'
}

if [ -z "${GRANTKEEPER_DATABASE_URL:-}" ] && [ -n "${PGHOST:-}" ]; then
    : "${PGUSER:?must be set with PGHOST}" "${PGDATABASE:?must be set with PGHOST}"
    pg_user=$(printf '%s' "$PGUSER" | urlencode)
    pg_database=$(printf '%s' "$PGDATABASE" | urlencode)
    pg_password=$(read_secret postgres_password)
    pg_password=$(printf '%s' "$pg_password" | urlencode)
    GRANTKEEPER_DATABASE_URL="postgresql+psycopg://$pg_user:$pg_password@$PGHOST:${PGPORT:-5432}/$pg_database"
    export GRANTKEEPER_DATABASE_URL
    unset pg_user pg_database pg_password
fi

if [ -z "${GRANTKEEPER_REDIS_URL:-}" ] && [ -n "${REDIS_HOST:-}" ]; then
    redis_password=$(read_secret redis_password)
    redis_password=$(printf '%s' "$redis_password" | urlencode)
    redis_address="$REDIS_HOST:${REDIS_PORT:-6379}/${REDIS_DB:-0}"
    case "${REDIS_TLS:-yes}" in
    yes)
        # The CA must be there now: without it every Redis connection would fail later.
        if [ ! -r "$secrets_dir/redis_ca" ] || [ ! -s "$secrets_dir/redis_ca" ]; then
            die "secret 'redis_ca' (the Redis CA certificate) is not readable at" \
                "$secrets_dir/redis_ca as uid $(id -u), or is empty: REDIS_TLS=yes needs it" \
                "(create secrets/redis_tls/ca.crt: see docker-compose.yml)"
        fi
        redis_ca=$(printf '%s' "$secrets_dir/redis_ca" | urlencode)
        GRANTKEEPER_REDIS_URL="rediss://:$redis_password@$redis_address?ssl_cert_reqs=required&ssl_ca_certs=$redis_ca"
        ;;
    no)
        GRANTKEEPER_REDIS_URL="redis://:$redis_password@$redis_address"
        ;;
    *)
        die "REDIS_TLS must be yes or no, not '$REDIS_TLS'"
        ;;
    esac
    export GRANTKEEPER_REDIS_URL
    unset redis_password redis_address redis_ca
fi

if [ -z "${GRANTKEEPER_ENCRYPTION_KEYS:-}" ] && [ -e "$secrets_dir/encryption_keys" ]; then
    keys=$(read_secret encryption_keys)
    keys=$(printf '%s\n' "$keys" | sed -e 's/#.*//' -e 's/[[:space:]]//g' | sed -e '/^$/d' | paste -s -d , -)
    [ -n "$keys" ] || die "secret 'encryption_keys' holds no key (create one: see docker-compose.yml)"
    GRANTKEEPER_ENCRYPTION_KEYS="$keys"
    export GRANTKEEPER_ENCRYPTION_KEYS
    unset keys
fi

unset secret_file secret_value

[ "$#" -gt 0 ] || die "no command given"
exec "$@"
