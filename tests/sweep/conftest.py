"""A throwaway PostgreSQL cluster for the sweep tests: initdb + pg_ctl on a temporary directory, a free port on
127.0.0.1, run as the postgres user when the tests run as root (the server refuses root); stopped and removed
afterwards, pass or fail. Skipped with the reason when the server or a driver (psycopg, psycopg2) is not installed (.ci/run
installs both)."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest


def _server_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgresql_url():
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
        pytest.skip("no PostgreSQL driver (psycopg or psycopg2) is installed (pip install 'keel[postgresql]')")
    initdb, pg_ctl = _server_binary("initdb"), _server_binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("the PostgreSQL server (initdb, pg_ctl) is not installed; .ci/run installs it "
                    "(apt-get install -y postgresql)")
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="keel-pg-")
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), _free_port()
    started = False
    try:
        subprocess.run([*prefix, initdb, "-D", data, "-U", "keel", "--auth=trust", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True)
        subprocess.run([*prefix, pg_ctl, "-D", data, "-l", os.path.join(root, "server.log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True)
        started = True
        subprocess.run([*prefix, _server_binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "keel",
                        "sweep"], check=True, capture_output=True)
        yield f"postgresql://keel@127.0.0.1:{port}/sweep"
    finally:
        if started:
            subprocess.run([*prefix, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
