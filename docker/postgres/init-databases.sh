#!/bin/sh
# Create the Prefect and MLflow databases, each owned by a login role of the same name
# that alone (besides superusers) may connect to it.
#
# The postgres image runs this once, when it initialises an empty data volume. It reads
# the passwords from PREFECT_DB_PASSWORD and MLFLOW_DB_PASSWORD, and connects as
# POSTGRES_USER through the usual libpq variables (PGHOST, PGPORT, PGPASSWORD), so that
# tests/test_postgres_stack.py runs the same script against a server it starts itself.
set -eu

: "${POSTGRES_USER:?POSTGRES_USER is not set: name the PostgreSQL superuser}"
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set: set it in docker/.env}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set: set it in docker/.env}"

# \getenv (psql 15 or newer) copies each password from the environment into a psql
# variable, and :'name' inserts it as a quoted literal, so no password appears in the SQL
# text or on a command line.
psql --no-psqlrc --set ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv prefect_password PREFECT_DB_PASSWORD
\getenv mlflow_password MLFLOW_DB_PASSWORD
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
-- Every role may connect to a new database by default: keep each service to its own.
REVOKE CONNECT ON DATABASE prefect FROM PUBLIC;
REVOKE CONNECT ON DATABASE mlflow FROM PUBLIC;
SQL
