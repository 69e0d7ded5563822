"""Helpers for the loopback deployment tests: docs/deploy.md's commands, processes, a federation.

The commands are templates whose placeholders the doc fills with its example values and the tests
with local paths and free ports; :func:`command` checks that the doc's rendering appears in
docs/deploy.md verbatim before returning the test's rendering, so the doc and the tests cannot
drift apart.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "deploy.md"
BIN = Path(sys.executable).parent  # flower-superlink, flwr, feddistill of this environment

# -- docs/deploy.md ---------------------------------------------------------------------------
TEMPLATES: dict[str, str] = {
    "env": "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 "
    "FLWR_DISABLE_UPDATE_CHECK=1",
    "certs": "deploy/make-certs.sh {certs} IP:192.168.1.10 DNS:superlink.lan",
    "superlink": "flower-superlink --ssl-ca-certfile {certs}/ca.crt --ssl-certfile "
    "{certs}/server.pem --ssl-keyfile {certs}/server.key --enable-supernode-auth "
    "--database {db} --host {host} --port {port}",
    "keygen": 'ssh-keygen -t ecdsa -b 384 -N "" -f {key}',
    "register": "flwr supernode register {key}.pub {federation}",
    "list": "flwr supernode list {federation}",
    "supernode": "flower-supernode --superlink {address} --root-certificates {certs}/ca.crt "
    "--auth-supernode-private-key {key} --port {node_port} "
    '--node-config \'data-path="{data}" cache-dir="{cache}"\'',
    "run": 'flwr run . {federation} --stream --run-config \'mode="deployment" '
    'data.labels="{labels}" data.num-clients={n} server.clients-per-round={n} '
    'server.evaluate-clients={n_eval} data.test-source="{test}" rounds={rounds} '
    'output-dir="{out}" compression.uplink="topk:0.1+q8+ef" '
    'compression.downlink="topk:0.1+q8" '
    "{model}{resume}'",
    "export": "feddistill export {out}/student --out {out}/export",
    "predict": 'feddistill predict --model {out}/export "{text}"',
}
CONFIG_TOML = """[superlink]
default = "{federation}"

[superlink.{federation}]
address = "{address}"
root-certificates = "{ca}"
"""
DOC_VALUES: dict[str, Any] = {
    "certs": "certs",
    "db": "superlink.db",
    "host": "0.0.0.0",
    "port": 9093,
    "key": "sn0",
    "federation": "feddistill",
    "address": "192.168.1.10:9093",
    "ca": "/opt/feddistill/certs/ca.crt",
    "node_port": 9094,
    "data": "/data/feddistill/train.csv",
    "cache": "/var/cache/feddistill",
    "labels": "World,Sports,Business,Sci/Tech",
    "n": 2,
    "n_eval": 2,
    "test": "/srv/feddistill/test.csv",
    "rounds": 20,
    "out": "/srv/feddistill/run1",
    "model": 'model.teacher="offline:all-minilm-l6-v2" model.freeze-embeddings=true '
    "data.max-length=64",
    "resume": "",
    "text": "Stocks rallied after the central bank held rates",
}
# The tiny model of tests/conftest.py TINY, as run-config text (the doc shows MiniLM instead).
TINY_MODEL = (
    'model.teacher="builtin:micro" model.student-layers=1 teacher.epochs=1 '
    "train.local-epochs=1 train.rising-epochs=0 data.max-length=24"
)
LABELS = "world,sports,business,science"  # the first four of feddistill.data.CORPUS_LABELS


def doc_blocks(lang: str) -> list[str]:
    """The fenced ``lang`` blocks of docs/deploy.md."""
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def doc_commands() -> list[str]:
    """Each command line of the doc's bash blocks (continuation lines joined)."""
    text = "\n".join(doc_blocks("bash")).replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def rendered_commands() -> set[str]:
    """Every command the deploy tests run, in the form docs/deploy.md shows it."""
    rendered = {t.format(**DOC_VALUES) for t in TEMPLATES.values()}
    rendered.add(TEMPLATES["run"].format(**{**DOC_VALUES, "resume": " resume=true"}))
    return rendered


def command(name: str, **values: Any) -> list[str]:
    """argv of template ``name`` with the test's ``values``, once its doc form is in the doc."""
    template = TEMPLATES[name]
    in_doc = template.format(**{**DOC_VALUES, **{k: v for k, v in values.items() if k == "resume"}})
    assert in_doc in doc_commands(), f"docs/deploy.md lost the command:\n{in_doc}"
    return shlex.split(template.format(**{**DOC_VALUES, **values}))


def config_toml(**values: Any) -> str:
    in_doc = CONFIG_TOML.format(**DOC_VALUES)
    assert in_doc in doc_blocks("toml"), f"docs/deploy.md lost the config block:\n{in_doc}"
    return CONFIG_TOML.format(**{**DOC_VALUES, **values})


def offline_env() -> dict[str, str]:
    """The variables the doc's ``export`` line sets (parsed from the doc's own line)."""
    line = TEMPLATES["env"]
    assert line in doc_commands(), f"docs/deploy.md lost the line:\n{line}"
    return dict(item.split("=", 1) for item in line.split()[1:])


# -- processes --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]

    def output(self) -> str:
        self.handle.flush()
        return self.log.read_text(errors="replace")


@dataclass
class Processes:
    """Every process a test starts, each in its own session; :meth:`stop_all` ends them by PID.

    Flower starts helpers in sessions of their own (SuperExec, ClientApp processes) and a
    SuperNode's ClientApps outlive it by ~10 s after SIGTERM, so stopping collects every
    descendant first, sends SIGTERM to the process groups and descendants, waits a grace period
    and then SIGKILLs whatever is left.
    """

    logs: Path
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = REPO) -> Started:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        handle = log.open("wb")
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        started = Started(name, proc, log, handle)
        self.started.append(started)
        return started

    def wait(self, started: Started, timeout: float) -> Started:
        """Wait for ``started`` to exit; fail with its output if it errs or overruns."""
        try:
            started.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{started.name} still running after {timeout} s:\n" + started.output()[-4000:]
            ) from None
        assert started.proc.returncode == 0, started.output()[-4000:]
        return started

    def stop_all(self, grace: float = 3.0) -> None:
        victims: dict[int, psutil.Process] = {}
        for s in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(s.proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    victims[p.pid] = p
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for s in self.started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(s.proc.pid, sig)  # the session's group (pgid == its leader's pid)
            for p in victims.values():
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)
            _, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
            victims = {p.pid: p for p in alive}
            if not victims:
                break
        for s in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.proc.wait(timeout=5)
            s.handle.close()


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (a crash, not a shutdown)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def base_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(offline_env())
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


# -- data -------------------------------------------------------------------------------------
def write_csv(path: Path, num: int, seed: int, *, label_column: str = "label") -> Path:
    """``num`` rows of the embedded corpus with string labels, as a device's data file."""
    from feddistill.data import CORPUS_LABELS, make_corpus

    texts, labels = make_corpus(num, num_classes=4, seed=seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", label_column])
        writer.writerows([t, CORPUS_LABELS[y]] for t, y in zip(texts, labels, strict=True))
    return path


# -- a loopback federation ---------------------------------------------------------------------
@dataclass
class Federation:
    """A TLS SuperLink with node authentication on a free loopback port, and its SuperNodes."""

    root: Path
    processes: Processes
    name: str = "loopback"
    port: int = field(default_factory=free_port)
    node_ids: dict[str, int] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, who: str) -> dict[str, str]:
        return base_env(self.root / "flwr-home" / who)

    def run(
        self, argv: list[str], who: str = "operator", timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            argv, cwd=REPO, env=self.env(who), capture_output=True, text=True, timeout=timeout
        )
        assert out.returncode == 0, f"{argv} failed:\n{out.stdout}\n{out.stderr}"
        return out

    def start_superlink(self) -> Started:
        self.run(command("certs", certs=self.certs))
        argv = command(
            "superlink",
            certs=self.certs,
            db=self.root / "superlink.db",
            host="127.0.0.1",
            port=self.port,
        )
        link = self.processes.start("superlink", argv, self.env("superlink"), cwd=self.root)
        deadline = time.time() + 60
        while "Uvicorn running on https" not in link.output():
            assert link.proc.poll() is None, f"SuperLink exited:\n{link.output()}"
            assert time.time() < deadline, f"SuperLink did not start:\n{link.output()}"
            time.sleep(0.2)
        ca = self.certs / "ca.crt"
        toml = config_toml(federation=self.name, address=self.address, ca=ca)
        (self.root / "flwr-home" / "operator" / "config.toml").write_text(toml)
        return link

    def key(self, device: str) -> Path:
        key = self.root / "keys" / device
        key.parent.mkdir(parents=True, exist_ok=True)
        self.run(command("keygen", key=key), who=device)
        return key

    def register(self, device: str, key: Path) -> int:
        out = self.run(command("register", key=key, federation=self.name))
        match = re.search(r"SuperNode (\d+) registered", out.stdout)
        assert match, out.stdout
        self.node_ids[device] = int(match.group(1))
        return self.node_ids[device]

    def start_supernode(self, device: str, key: Path, data: Path) -> Started:
        argv = command(
            "supernode",
            address=self.address,
            certs=self.certs,
            key=key,
            node_port=free_port(),
            data=data,
            cache=self.root / "cache" / device,
        )
        return self.processes.start(device, argv, self.env(device), cwd=self.root)

    def flwr_run(
        self, out: Path, test: Path, n: int, n_eval: int, rounds: int, resume: str = ""
    ) -> subprocess.CompletedProcess[str]:
        argv = command(
            "run",
            federation=self.name,
            labels=LABELS,
            n=n,
            n_eval=n_eval,
            test=test,
            rounds=rounds,
            out=out,
            model=TINY_MODEL,
            resume=resume,
        )
        return self.run(argv, timeout=400)
