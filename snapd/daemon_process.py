"""`snapd serve` as a child process, as a scheduler sees it: for the demo, bench/ and the tests.

    with DaemonProcess(state_dir, "--pool-size", "2", import_roots=[snapshot_dir]) as daemon:
        image = daemon.client.register_image(state, mem)["id"]   # files beneath an import root
        wait_pool(daemon.client, 2, prepared=2)

``wrapper`` is a command the daemon's command line is handed to, e.g. ``("setpriv", "--reuid=1000", ...)`` to
run it as another user (tests/test_jail_unprivileged.py); the wrapper must exec it, so that the process we
signal is the daemon.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from snapd.client import SnapdClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DaemonStartError(RuntimeError):
    """`snapd serve` exited or did not answer on its socket in time."""


class PoolNotWarmError(RuntimeError):
    """The daemon's pool did not reach the warm and prepared workers asked for."""


class DaemonProcess:
    def __init__(self, state_dir: str, *args: str, timeout: float = 60.0, prepared: int | None = None,
                 stdout=subprocess.DEVNULL, import_roots=(), wrapper=()):
        self.socket_path = os.path.join(state_dir, "snapd.sock")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        if prepared is not None:
            env["SNAPD_PREPARED"] = str(prepared)
        roots = [arg for root in import_roots for arg in ("--import-root", os.fspath(root))]  # the API reads there
        self.process = subprocess.Popen([*wrapper, sys.executable, "-m", "snapd.cli", "serve", "--state-dir",
                                         state_dir, "--socket", self.socket_path, *roots, *args], env=env,
                                        stdout=stdout)
        self.client = SnapdClient(self.socket_path)
        try:
            self._wait_for_socket(time.monotonic() + timeout)
        except BaseException:  # it did not come up, answered wrongly, or we were interrupted: do not leave it
            self.stop()
            raise

    def _wait_for_socket(self, deadline: float) -> None:
        while True:
            if os.path.exists(self.socket_path):
                try:
                    self.client.images()
                    return
                except OSError:
                    self.client.close()
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise DaemonStartError(f"snapd serve did not come up (exit status {self.process.poll()})")
            time.sleep(0.02)

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def wait_pool(client: SnapdClient, minimum: int, timeout: float = 60.0, prepared: int = 0) -> None:
    """Until ``minimum`` plain warm workers and ``prepared`` prepared ones are ready; a pool that does not get
    there is an error (a latency run would measure cold restores under a warm-pool label)."""
    deadline = time.monotonic() + timeout
    values = {}
    while time.monotonic() < deadline:
        samples = client.metric_samples()
        values = {k: samples.get(k, 0) for k in ("snapd_pool_idle_workers", "snapd_pool_prepared_workers")}
        if values["snapd_pool_idle_workers"] >= minimum and values["snapd_pool_prepared_workers"] >= prepared:
            return
        time.sleep(0.02)
    raise PoolNotWarmError(f"the daemon's pool did not reach {minimum} warm and {prepared} prepared workers "
                           f"within {timeout:.0f} s (it has {values})")
