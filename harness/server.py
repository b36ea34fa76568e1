"""A shared MLflow tracking server: `make server` (HOST=, PORT=, BACKEND_STORE_URI=, ARTIFACTS=).

On the loopback interface (127.0.0.1, the default) it is `mlflow server` as it is: only this
machine reaches it. On any other interface, where anyone on the network could read, change or
delete every run, it runs MLflow's basic-auth app, through this module's `create_app` (MLflow's
app, with its 403s said in JSON as every other MLflow error is), and refuses to start without an
admin password:

- MLFLOW_AUTH_ADMIN_PASSWORD (MLflow's own variable), else the file SECRETS/admin-password,
  created on first start with a random password; the password is never printed in full.
- The auth app keeps its users in SECRETS/basic_auth.db, and signs its forms with the key in
  SECRETS/flask-secret-key (MLFLOW_FLASK_SERVER_SECRET_KEY overrides it), made the same way.
- SECRETS is made (or made again) readable by its owner alone: the folder 0700, its files 0600.
- The admin's password is the one above at every start: to rotate it, delete the file (a new
  one is made) or set MLFLOW_AUTH_ADMIN_PASSWORD, and restart; the old one no longer works.
- Users other than the admin read every experiment (default_permission = READ) and change only
  what they create or are given; the admin creates them (`mlflow.server.auth` client or REST).

Clients, sweeps included, authenticate with MLflow's own variables MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD; tracking.uri never carries credentials (they would be logged).

    python -m harness.server [--host H] [--port P] [--backend-store-uri URI]
                             [--artifacts-destination DIR] [--secrets DIR] [-- mlflow options]

What the harness sets itself (where it listens, the app, the stores) cannot be given again among
the mlflow options: the second --host would win, past the checks above.
"""

import argparse
import ipaddress
import os
import secrets
import shlex
import socket
import stat
import sys
import urllib.parse
from pathlib import Path

from harness.core.errors import ConfigError, refused

ADMIN = "admin"
MIN_PASSWORD = 12  # MLflow's auth app refuses shorter ones
APP = "harness-basic-auth"  # this module's create_app, registered in pyproject.toml
# mlflow server options the harness sets: given again, they would override its checks.
OWN_OPTIONS = {"--host": "HOST=", "-h": "HOST=", "--port": "PORT=", "-p": "PORT=",
               "--app-name": "(the harness chooses it by HOST)",
               "--backend-store-uri": "BACKEND_STORE_URI=",
               "--artifacts-destination": "ARTIFACTS="}
BIND_OPTIONS = ("--bind", "--host", "-b")  # inside --gunicorn-opts / --uvicorn-opts
DATABASE_TIMEOUT_S = 5
JOBS_VARIABLE = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"  # MLflow's switch for its job runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--backend-store-uri",
                        default="postgresql://harness:harness@127.0.0.1:5432/harness")
    parser.add_argument("--artifacts-destination", default="mlartifacts")
    parser.add_argument("--secrets", default=".harness/server",
                        help="where the admin password, the auth app's users and its key live")
    parser.add_argument("mlflow_options", nargs="*", help="more `mlflow server` options")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
               args.backend_store_uri, "--artifacts-destination", args.artifacts_destination,
               "--host", args.host, "--port", str(args.port), *args.mlflow_options]
    environment = dict(os.environ)
    # MLflow 3's server job runner (GenAI judges, prompt optimisation) starts seven consumer
    # processes of about 200 MiB each, and doubles the start: the harness runs no server jobs.
    # A user who wants them sets the variable to true.
    environment.setdefault(JOBS_VARIABLE, "false")
    try:
        check_options(args.mlflow_options)
        check_backend(args.backend_store_uri)
        if not loopback(args.host):
            environment.update(_authentication(Path(args.secrets)))
            command[4:4] = ["--app-name", APP]
    except ConfigError as error:
        return refused(error)
    if not loopback(args.host):
        print(f"[harness] listening on {args.host}:{args.port} with authentication (MLflow's "
              f"basic-auth app); clients set MLFLOW_TRACKING_USERNAME and "
              f"MLFLOW_TRACKING_PASSWORD")
    sys.stdout.flush()
    os.execvpe(command[0], command, environment)


def check_options(options: list[str]) -> None:
    """ConfigError for an mlflow option that would set again what the harness sets: the bind
    address (also inside a server's own options), the port, the app, the stores."""
    for option in options:
        name = option.split("=", 1)[0]
        if name in OWN_OPTIONS:
            raise ConfigError(f"{name} among the mlflow options (ARGS): the harness sets it "
                              f"itself, and a second one would override its checks (a --host "
                              f"beyond loopback without authentication); give it as "
                              f"{OWN_OPTIONS[name]} (make server HOST=0.0.0.0 PORT=5001)")
        if name in ("--gunicorn-opts", "--uvicorn-opts", "--waitress-opts"):
            inner = option.split("=", 1)[1] if "=" in option else \
                options[options.index(option) + 1] if option != options[-1] else ""
            if any(word.split("=", 1)[0] in BIND_OPTIONS for word in shlex.split(inner)):
                raise ConfigError(f"{name} binds the server itself ({inner!r}): the harness "
                                  "sets where it listens; give it as HOST= and PORT=")


def check_backend(uri: str) -> None:
    """ConfigError, within seconds, where a PostgreSQL backend store does not answer (MLflow
    would retry for minutes, through SQLAlchemy's tracebacks)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme.startswith("postgresql"):
        return
    shown = uri.replace(f":{parts.password}@", ":***@") if parts.password else uri
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5432),
                                      timeout=DATABASE_TIMEOUT_S):
            pass
    except OSError as error:
        raise ConfigError(
            f"the backend store {shown} does not answer ({error.strerror or error}); start "
            "PostgreSQL there (Debian: `pg_ctlcluster <version> main start`; this repository's "
            "`bash .ci/services.sh` installs, starts and prints one), or give another, e.g. "
            "make server BACKEND_STORE_URI=sqlite:///mlflow-server.db") from None


def loopback(host: str) -> bool:
    """Whether `host` is reached from this machine alone."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: what it resolves to here
        try:
            return all(ipaddress.ip_address(found[4][0]).is_loopback
                       for found in socket.getaddrinfo(host, None))
        except socket.gaierror:
            return False


def _authentication(folder: Path) -> dict:
    """The environment of MLflow's basic-auth app: its config file, the admin's password and
    the forms' key (see the module's docstring); the admin made, or given this password."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)  # also a folder that existed with wider permissions
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    if password is None:
        password = _secret(folder / "admin-password", "the admin password")
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the admin password has {len(password)} characters; MLflow's auth "
                          f"app needs at least {MIN_PASSWORD}: set MLFLOW_AUTH_ADMIN_PASSWORD "
                          "to a longer one, or unset it to use a generated one")
    key = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or _secret(
        folder / "flask-secret-key", "the key that signs the auth app's forms")
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{(folder / 'basic_auth.db').resolve()}\n"
                      f"admin_username = {ADMIN}\n"
                      "authorization_function = mlflow.server.auth:"
                      "authenticate_request_basic_auth\n")
    environment = {"MLFLOW_AUTH_CONFIG_PATH": str(config),
                   "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": key}
    _admin_with(password, environment)
    for path in folder.iterdir():  # the database and the config too: readable by you alone
        if path.is_file():
            path.chmod(0o600)
    return environment


def _admin_with(password: str, environment: dict) -> None:
    """The auth database's admin made with `password`, or given it where it has another: MLflow
    creates the admin once and keeps its first password for ever."""
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)  # MLflow's auth config is read from the environment
    try:
        from mlflow.server.auth.config import read_auth_config
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore()
        store.init_db(read_auth_config().database_uri)
        if not store.has_user(ADMIN):
            store.create_user(ADMIN, password, is_admin=True)
        elif not store.authenticate_user(ADMIN, password):
            store.update_user(ADMIN, password=password)
            print(f"[harness] the admin's password changed: the new one ({password[:3]}..., "
                  f"{len(password)} characters) is the admin's now; the old no longer works")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _secret(path: Path, what: str) -> str:
    """The secret in `path`, made there (readable by its owner alone) where it is not yet.
    ConfigError where others can read it."""
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(24))
        print(f"[harness] made {what} in {path} (readable by you alone)")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} holds {what} and others can read it (mode "
                          f"{stat.filemode(mode)}): run `chmod 600 {path}`, or remove it to make "
                          "a new one")
    found = path.read_text().strip()
    if what == "the admin password":
        print(f"[harness] admin user {ADMIN!r}, password in {path} ({found[:3]}..., "
              f"{len(found)} characters)")
    return found


def create_app():
    """MLflow's basic-auth app (what `mlflow server --app-name basic-auth` serves), whose
    refusals (403) are JSON with MLflow's error code, naming the user and what was refused, as
    every other MLflow error is: a client reads them as PERMISSION_DENIED, not as an HTML page.
    `mlflow server --app-name harness-basic-auth` loads it (pyproject.toml's entry point)."""
    from flask import jsonify, request
    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as basic_auth

    @flask_app.after_request
    def forbidden_as_json(response):
        if response.status_code != 403 or response.is_json:
            return response
        user = request.authorization.username if request.authorization else "anonymous"
        refusal = jsonify(error_code="PERMISSION_DENIED",
                          message=f"Permission denied: user {user!r} may not {request.method} "
                                  f"{request.path}; ask the experiment's owner or the admin for "
                                  "a permission (EDIT or MANAGE)")
        refusal.status_code = 403
        return refusal

    return basic_auth(flask_app)


if __name__ == "__main__":
    sys.exit(main())
