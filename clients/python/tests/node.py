"""Starting the real `runguard` binary for the tests, the way `tests/blackbox/harness.rs` does.

The binary is built once per test session with ``cargo build -p runguard-node --bin runguard`` from the
workspace root; cargo reports where it put the executable, so ``CARGO_TARGET_DIR`` and cargo config are
respected. ``RUNGUARD_BIN`` names a prebuilt binary instead. Each node listens on ``127.0.0.1:0`` with its
own temporary data directory, prints one line with its address, and is killed when the test is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

WORKSPACE = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Token:
    name: str
    tenant: str
    role: str
    secret: str

    def toml(self) -> str:
        sha = hashlib.sha256(self.secret.encode()).hexdigest()
        return f'[[tokens]]\nname = "{self.name}"\ntenant = "{self.tenant}"\nrole = "{self.role}"\nsha256 = "{sha}"\n'


ADMIN = Token("root", "ops", "admin", "admin-secret")
ACME_WORKER = Token("acme-worker", "acme", "worker", "acme-w-secret")
ACME_OPERATOR = Token("acme-operator", "acme", "operator", "acme-o-secret")
ACME_OPERATOR_2 = Token("acme-operator-2", "acme", "operator", "acme-o2-secret")
TOKENS = (ADMIN, ACME_WORKER, ACME_OPERATOR, ACME_OPERATOR_2)


def runguard_bin() -> Path:
    """The `runguard` executable, built now (once per process) unless ``RUNGUARD_BIN`` names one."""
    given = os.environ.get("RUNGUARD_BIN")
    if given:
        return Path(given)
    cached = _BUILT.get("bin")
    if cached is not None:
        return cached
    cargo = os.environ.get("CARGO", "cargo")
    done = subprocess.run(
        [cargo, "build", "-p", "runguard-node", "--bin", "runguard", "--message-format=json-render-diagnostics"],
        cwd=WORKSPACE,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        check=True,
    )
    for line in done.stdout.splitlines():
        message = json.loads(line) if line.startswith("{") else {}
        if message.get("reason") == "compiler-artifact" and message.get("target", {}).get("name") == "runguard":
            executable = message.get("executable")
            if executable:
                _BUILT["bin"] = Path(executable)
                return _BUILT["bin"]
    raise RuntimeError("cargo built no `runguard` executable")


_BUILT: dict[str, Path] = {}


class Node:
    """One running node; ``base_url`` is where it listens."""

    def __init__(self, config: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="runguard-py-"))
        self.config = self.dir / "runguard.toml"
        self.config.write_text(config + "\n" + "\n".join(t.toml() for t in TOKENS))
        self.base_url = ""
        self._process: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNGUARD_")}
        log = open(self.dir / "stderr.log", "a")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
            [str(runguard_bin()), "serve", "--listen", "127.0.0.1:0", "--data", str(self.dir / "data")]
            + ["--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        log.close()
        self._process = process
        lines: queue.Queue[str] = queue.Queue()

        def drain() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line)

        threading.Thread(target=drain, daemon=True).start()
        try:
            first = lines.get(timeout=START_TIMEOUT_S).strip()
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"runguard did not report its address; log:\n{self.logs()}") from None
        prefix = "runguard listening on "
        if not first.startswith(prefix):
            self.stop()
            raise RuntimeError(f"unexpected first line `{first}`; log:\n{self.logs()}")
        self.base_url = first[len(prefix) :]

    def logs(self) -> str:
        path = self.dir / "stderr.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=30)
            self._process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
