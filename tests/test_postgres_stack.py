"""`atmorep pipeline` against a Prefect server and an MLflow server backed by PostgreSQL.

The test runs the stack of docker/compose.yaml as plain processes on 127.0.0.1. A
PostgreSQL server from the distribution's binaries is initialised in a temporary folder
and listens on a free port. docker/postgres/init-databases.sh creates the `prefect` and
`mlflow` databases and roles. `prefect server start` uses the `prefect` database, and
`mlflow server` the `mlflow` database with a served artifact folder. After the pipeline
has run against both servers, the test reads the runs, metrics, registered models and
flow runs back through the servers and straight from the databases.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user that
the Debian package creates.
"""

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient
from test_deployment import _free_port, _stop

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
INIT_SCRIPT = REPO_ROOT / "docker" / "postgres" / "init-databases.sh"
STAGES = {"pipeline", "ingest", "pretrain", "evaluate", "finetune"}
PIPELINE_ARGUMENTS = ["--pretrain-steps", "3", "--finetune-steps", "2", "--batch-size", "2", "--nproc-per-node", "1"]


def _postgres_bin_dir() -> Path | None:
    """Return the folder of initdb and postgres: pg_config's, else Debian's newest, else PATH's."""
    candidates = []
    if shutil.which("pg_config"):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        candidates.append(Path(bindir))
    candidates += [Path(path) for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major_version, reverse=True)]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    for candidate in candidates:
        if all((candidate / name).is_file() for name in ("initdb", "postgres", "pg_isready", "psql")):
            return candidate
    return None


def _major_version(bin_dir: str) -> int:
    version = Path(bin_dir).parent.name
    return int(version) if version.isdigit() else 0


def _server_user() -> pwd.struct_passwd | None:
    """Return the account to run PostgreSQL as: `postgres` as root, else None (the current user)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no `postgres` user exists to run the PostgreSQL server as")


def _wait_http(url: str, process: subprocess.Popen, name: str, log: Path, timeout: float = 180) -> None:
    """Poll `url` until it returns 200; raise if `process` exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{name} at {url} not healthy after {timeout} s; log:\n{log.read_text()[-3000:]}")


def _wait_postgres(bin_dir: Path, port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"postgres exited with status {process.returncode}; log:\n{log.read_text()[-3000:]}")
        ready = subprocess.run([str(bin_dir / "pg_isready"), "--host", "127.0.0.1", "--port", str(port)],
                               capture_output=True)
        if ready.returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"postgres on 127.0.0.1:{port} not ready after {timeout} s; log:\n{log.read_text()[-3000:]}")


def _run_checked(command: list[str], **kwargs) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
    assert completed.returncode == 0, f"{command[:2]} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server on 127.0.0.1 with the databases of docker/postgres/init-databases.sh."""
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found: install Debian's postgresql package")
    user = _server_user()

    # Not under pytest's tmp_path: that folder is private to the current user, and the
    # server may run as another one.
    root = Path(tempfile.mkdtemp(prefix="atmorep-postgres-"))
    logs = tmp_path_factory.mktemp("postgres-logs")
    admin_password = secrets.token_hex(16)
    password_file = root / "admin-password"
    password_file.write_text(admin_password + "\n")
    as_server_user = {}
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
        os.chown(password_file, user.pw_uid, user.pw_gid)
        as_server_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    process = None
    log = None
    try:
        _run_checked(
            [str(bin_dir / "initdb"), "--pgdata", str(root / "data"), "--username", "atmorep_admin",
             f"--pwfile={password_file}", "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"],
            cwd=root, **as_server_user,
        )
        port = _free_port()
        log_path = logs / "postgres.log"
        log = open(log_path, "w")
        # fsync off: the data are thrown away after the test, so durability buys nothing.
        process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(root / "data"), "-h", "127.0.0.1", "-p", str(port),
             "-k", str(root), "-c", "fsync=off", "-c", "synchronous_commit=off"],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_server_user,
        )
        _wait_postgres(bin_dir, port, process, log_path)

        role_passwords = {"prefect": secrets.token_hex(16), "mlflow": secrets.token_hex(16)}
        _run_checked(
            ["sh", str(INIT_SCRIPT)],
            env={
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGPASSWORD": admin_password,
                "POSTGRES_USER": "atmorep_admin",
                "PREFECT_DB_PASSWORD": role_passwords["prefect"],
                "MLFLOW_DB_PASSWORD": role_passwords["mlflow"],
            },
        )
        yield {"port": port, "passwords": role_passwords, "logs": logs}
    finally:
        if process is not None and process.poll() is None:
            # SIGINT is PostgreSQL's fast shutdown: it ends the sessions and stops cleanly.
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        if log is not None:
            log.close()
        shutil.rmtree(root, ignore_errors=True)


def _database_url(postgres: dict, database: str, driver: str = "postgresql") -> str:
    return f"{driver}://{database}:{postgres['passwords'][database]}@127.0.0.1:{postgres['port']}/{database}"


def _connect(postgres: dict, database: str) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1", port=postgres["port"], dbname=database, user=database,
        password=postgres["passwords"][database],
    )


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    """The Prefect and MLflow servers on PostgreSQL, bound to 127.0.0.1, and their URLs."""
    home = tmp_path_factory.mktemp("stack-home")
    prefect_port, mlflow_port = _free_port(), _free_port()
    base_env = {**os.environ, "PREFECT_HOME": str(home / "prefect-server")}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        base_env.pop(name, None)

    prefect_log = postgres["logs"] / "prefect-server.log"
    mlflow_log = postgres["logs"] / "mlflow-server.log"
    servers = []
    with open(prefect_log, "w") as prefect_output, open(mlflow_log, "w") as mlflow_output:
        try:
            servers.append(subprocess.Popen(
                [str(BIN_DIR / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                env={**base_env,
                     "PREFECT_API_DATABASE_CONNECTION_URL": _database_url(postgres, "prefect", "postgresql+asyncpg")},
                stdout=prefect_output, stderr=subprocess.STDOUT, start_new_session=True,
            ))
            # The store URI is passed as a variable, as docker/compose.yaml does, so that
            # the password stays off the command line.
            servers.append(subprocess.Popen(
                [str(BIN_DIR / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                 "--workers", "1", "--serve-artifacts"],
                env={**base_env,
                     "MLFLOW_BACKEND_STORE_URI": _database_url(postgres, "mlflow"),
                     "MLFLOW_ARTIFACTS_DESTINATION": str(home / "mlartifacts")},
                stdout=mlflow_output, stderr=subprocess.STDOUT, start_new_session=True,
            ))
            prefect_url = f"http://127.0.0.1:{prefect_port}"
            mlflow_url = f"http://127.0.0.1:{mlflow_port}"
            _wait_http(f"{prefect_url}/api/health", servers[0], "Prefect server", prefect_log)
            _wait_http(f"{mlflow_url}/health", servers[1], "MLflow server", mlflow_log)
            yield {"prefect_api": f"{prefect_url}/api", "mlflow": mlflow_url, "artifacts": home / "mlartifacts"}
        finally:
            # Signal both first, so that their shutdowns overlap.
            for server in servers:
                if server.poll() is None:
                    os.killpg(server.pid, signal.SIGTERM)
            for server in servers:
                _stop(server)


@pytest.fixture(scope="module")
def pipeline_run(stack, data_mirror, tmp_path_factory):
    """Run `atmorep pipeline` with few steps against the stack and return its stdout."""
    home = tmp_path_factory.mktemp("atmorep-home")
    env = {
        **os.environ,
        "ATMOREP_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "ATMOREP_DATA_MIRROR": str(data_mirror),
        "PREFECT_API_URL": stack["prefect_api"],
        "MLFLOW_TRACKING_URI": stack["mlflow"],
    }
    completed = subprocess.run(
        [str(BIN_DIR / "atmorep"), "pipeline", *PIPELINE_ARGUMENTS],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    return completed.stdout


@pytest.fixture(scope="module")
def mlflow_client(stack, pipeline_run):
    return MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])


def _runs_by_stage(client: MlflowClient) -> dict:
    experiment = client.get_experiment_by_name("atmorep")
    return {run.data.tags["atmorep.stage"]: run for run in client.search_runs([experiment.experiment_id])}


def test_pipeline_records_runs_in_mlflow_server(mlflow_client):
    runs = _runs_by_stage(mlflow_client)

    assert set(runs) == STAGES
    for stage, run in runs.items():
        assert run.info.status == "FINISHED", stage
    assert "train/loss" in runs["pretrain"].data.metrics
    assert runs["evaluate"].data.metrics["forecast/rmse/t2m/lead_1h"] > 0
    assert runs["finetune"].data.metrics["forecast/rmse/t2m/lead_1h"] > 0


def test_mlflow_database_holds_runs_and_models(postgres, mlflow_client):
    runs = _runs_by_stage(mlflow_client)
    with _connect(postgres, "mlflow") as connection:
        run_ids = {row[0] for row in connection.execute("SELECT run_uuid FROM runs")}
        models = {row[0] for row in connection.execute("SELECT name FROM registered_models")}
        versions = connection.execute("SELECT name, version FROM model_versions ORDER BY name").fetchall()
        loss_rows = connection.execute(
            "SELECT count(*) FROM metrics WHERE key = 'train/loss' AND run_uuid = %s",
            (runs["pretrain"].info.run_id,),
        ).fetchone()[0]

    assert run_ids == {run.info.run_id for run in runs.values()}
    assert models == {"atmorep", "atmorep-forecast"}
    assert versions == [("atmorep", 1), ("atmorep-forecast", 1)]
    assert loss_rows >= 1


def test_artifacts_served_from_artifact_folder(stack, mlflow_client):
    runs = _runs_by_stage(mlflow_client)
    evaluate_run = runs["evaluate"]

    listed = {item.path for item in mlflow_client.list_artifacts(evaluate_run.info.run_id)}
    assert "scores.csv" in listed
    assert evaluate_run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = stack["artifacts"] / evaluate_run.info.experiment_id / evaluate_run.info.run_id / "artifacts" / "scores.csv"
    assert stored.is_file()
    model_files = list(stack["artifacts"].glob(f"{evaluate_run.info.experiment_id}/models/*/artifacts/MLmodel"))
    assert len(model_files) == 2, model_files


def test_prefect_database_holds_flow_runs(postgres, mlflow_client):
    runs = _runs_by_stage(mlflow_client)
    with _connect(postgres, "prefect") as connection:
        flow_runs = connection.execute(
            "SELECT flow.name, flow_run.id::text, flow_run.state_type FROM flow_run "
            "JOIN flow ON flow.id = flow_run.flow_id"
        ).fetchall()

    assert len(flow_runs) == len(STAGES), flow_runs
    states = {name: state for name, _, state in flow_runs}
    assert states == {stage: "COMPLETED" for stage in STAGES}
    flow_run_ids = {flow_run_id for _, flow_run_id, _ in flow_runs}
    for stage, run in runs.items():
        assert run.data.tags["atmorep.prefect_flow_run_id"] in flow_run_ids, stage


def test_roles_reach_only_own_database(postgres):
    for role, other in (("prefect", "mlflow"), ("mlflow", "prefect")):
        with pytest.raises(psycopg.OperationalError, match="permission denied"):
            psycopg.connect(
                host="127.0.0.1", port=postgres["port"], dbname=other, user=role,
                password=postgres["passwords"][role],
            )


def test_pipeline_prints_scores(pipeline_run):
    assert "Zero-shot scores" in pipeline_run
    assert "Fine-tuned scores" in pipeline_run
