"""A shared MLflow tracking server: `make server` (HOST=, PORT=, BACKEND_STORE_URI=, ARTIFACTS=).

On the loopback interface (127.0.0.1, the default) it is `mlflow server` as it is: only this
machine reaches it. On any other interface, where anyone on the network could read, change or
delete every run, it runs MLflow's basic-auth app (`--app-name basic-auth`) and refuses to start
without an admin password:

- MLFLOW_AUTH_ADMIN_PASSWORD (MLflow's own variable), else the file SECRETS/admin-password,
  created on first start with a random password, readable only by its owner (a file others can
  read is refused); the password is never printed in full.
- The auth app keeps its users in SECRETS/basic_auth.db, and signs its forms with the key in
  SECRETS/flask-secret-key (MLFLOW_FLASK_SERVER_SECRET_KEY overrides it), made the same way.
- Users other than the admin read every experiment (default_permission = READ) and change only
  what they create or are given; the admin creates them (`mlflow.server.auth` client or REST).

Clients, sweeps included, authenticate with MLflow's own variables MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD; tracking.uri never carries credentials (they would be logged).

    python -m harness.server [--host H] [--port P] [--backend-store-uri URI]
                             [--artifacts-destination DIR] [--secrets DIR] [-- mlflow options]
"""

import argparse
import ipaddress
import os
import secrets
import socket
import stat
import sys
from pathlib import Path

from harness.core.errors import ConfigError, refused

ADMIN = "admin"
MIN_PASSWORD = 12  # MLflow's auth app refuses shorter ones


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
    if not loopback(args.host):
        try:
            environment.update(_authentication(Path(args.secrets)))
        except ConfigError as error:
            return refused(error)
        command[4:4] = ["--app-name", "basic-auth"]
        print(f"[harness] listening on {args.host}:{args.port} with authentication (MLflow's "
              f"basic-auth app); clients set MLFLOW_TRACKING_USERNAME and "
              f"MLFLOW_TRACKING_PASSWORD")
    sys.stdout.flush()
    os.execvpe(command[0], command, environment)


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
    the forms' key (see the module's docstring)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": key}


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


if __name__ == "__main__":
    sys.exit(main())
