"""Start and stop a real `tritonserver` on loopback.

Where the binary comes from: an explicit path, `tritonserver` on PATH or /opt/tritonserver (a GPU host's own
installation), else the build shipped in the `nvidia-pytriton` wheel. That build has only the python backend, and
its backend stub is built once per Python version, so the stub matching this interpreter is put beside
`libtriton_python.so` in a private backend folder, and the stub's embedded Python is pointed at this interpreter
(its libpython on LD_LIBRARY_PATH, its bin/ first on PATH so the stub picks up this environment's packages).

The server runs in its own process group: stopping it signals the group, waits, and checks that no process of
the group (the server or a python-backend stub) is left.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingDependencyError, SlimError
from .repository import read_repository

LOOPBACK = "127.0.0.1"
SYSTEM_LOCATIONS = ("/opt/tritonserver/bin/tritonserver",)
# The python backend grows its shared memory in steps; big steps avoid many remaps for large logits.
PYTHON_SHM_DEFAULT = 16 << 20
PYTHON_SHM_GROWTH = 64 << 20


class ServerError(SlimError):
    """tritonserver did not start or stopped unexpectedly; the message quotes the relevant log line."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path  # folder of backend folders (<backend>/libtriton_<backend>.so)
    lib_dirs: tuple[Path, ...]  # extra shared-library folders the binary needs
    source: str  # "pytriton" (the wheel's build) or "system"
    python_stub: Path | None = None  # pytriton only: the stub to put beside libtriton_python.so

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(sorted(p.name for p in self.backend_dir.iterdir() if p.is_dir())) \
            if self.backend_dir.is_dir() else ()


def find_tritonserver(binary: str | os.PathLike | None = None) -> TritonInstall:
    """Locate a tritonserver; MissingDependencyError says how to get one when there is none."""
    candidates = [Path(binary)] if binary else [Path(p) for p in (shutil.which("tritonserver"),
                                                                  *SYSTEM_LOCATIONS) if p]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return TritonInstall(binary=path.resolve(), backend_dir=path.resolve().parent.parent / "backends",
                                 lib_dirs=(), source="system")
    if binary:
        raise MissingDependencyError(f"tritonserver {binary} does not exist or is not executable: fix --tritonserver")
    return _pytriton_install()


def _pytriton_install() -> TritonInstall:
    import importlib.util

    found = importlib.util.find_spec("pytriton")
    if found is None or not found.submodule_search_locations:
        raise MissingDependencyError("no tritonserver here: install Triton, or `pip install nvidia-pytriton` for "
                                     "the CPU build with the python backend (`pip install 'slim-trt[triton]'`)")
    root = Path(next(iter(found.submodule_search_locations)))
    dist = root / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file():
        raise MissingDependencyError(f"nvidia-pytriton at {root} has no tritonserver binary: reinstall it")
    if not stub.is_file():
        shipped = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise MissingDependencyError(f"nvidia-pytriton ships python backend stubs for Python {', '.join(shipped)}, "
                                     f"not {version}: use one of those Pythons")
    libs = [d for d in (root.parent / "nvidia_pytriton.libs", dist / "external_libs") if d.is_dir()]
    install = TritonInstall(binary=binary, backend_dir=dist / "backends", lib_dirs=tuple(libs), source="pytriton",
                            python_stub=stub)
    missing = _missing_libraries(stub, _environment(install))
    if missing:
        raise MissingDependencyError(
            f"the python backend stub cannot load {', '.join(missing)}: this Python ({sys.executable}) needs its "
            "shared libpython (a Python built with --enable-shared, or the distribution's libpython3.X package)")
    return install


def _libpython_dir() -> str | None:
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("INSTSONAME") or ""
    return libdir if libdir and name and (Path(libdir) / name).exists() else None


def _environment(install: TritonInstall) -> dict[str, str]:
    env = os.environ.copy()
    if install.source == "pytriton":
        # A system install's stub embeds its own Python; only the wheel's stub is pointed at this interpreter.
        lib_dirs = [d for d in (_libpython_dir(), *map(str, install.lib_dirs)) if d]
        env["LD_LIBRARY_PATH"] = ":".join(lib_dirs + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
        # The stub's embedded Python finds its prefix (and so this venv's site-packages) from `python3` on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # model.py may import slim_trt (the custom-op session helper) even when slim_trt is not installed.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = ":".join([package_root] + [p for p in env.get("PYTHONPATH", "").split(":") if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # keep __pycache__ out of the model repository
    return env


def _missing_libraries(executable: Path, env: dict[str, str]) -> list[str]:
    ldd = shutil.which("ldd")
    if not ldd:
        return []
    out = subprocess.run([ldd, str(executable)], env=env, capture_output=True, text=True, timeout=30,
                         check=False).stdout
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def _death_signal_setter():
    """A function for the child (between fork and exec) that asks Linux to SIGTERM it, a graceful stop for Triton,
    if the process that started it dies without stopping it: even a killed `slim-trt serve` leaves no server.
    prctl is looked up here, in the parent, so the child does no import or dlopen while other threads may hold
    their locks."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no death signal
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def plan_models(repo_manifest: dict, backends: tuple[str, ...], gpu: bool,
                wanted: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Which models of a repository this server can load, and why each other one is left out."""
    models = repo_manifest["models"]
    if wanted:
        unknown = [m for m in wanted if m not in models]
        if unknown:
            raise SlimError(f"no model {', '.join(unknown)} in the repository (it has {', '.join(models)})")
    skipped: dict[str, str] = {}
    for name, entry in models.items():
        if wanted and name not in wanted:
            skipped[name] = "not asked for (--models)"
        elif entry["backend"] not in backends:
            skipped[name] = f"this tritonserver has no {entry['backend']} backend"
        elif entry["device"] == "gpu" and not gpu:
            skipped[name] = "needs a GPU"
    changed = True
    while changed:  # a model that calls a skipped model cannot serve either
        changed = False
        for name, entry in models.items():
            gone = [d for d in entry.get("depends_on", []) if d in skipped or d not in models]
            if name not in skipped and gone:
                skipped[name] = f"calls {gone[0]}, which is not loaded"
                changed = True
    load = [m for m in models if m not in skipped]
    if wanted:
        refused = [m for m in wanted if m in skipped]
        if refused:
            raise SlimError(f"cannot load {refused[0]} here: {skipped[refused[0]]}")
    return load, skipped


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def processes_in_group(pgid: int) -> list[int]:
    """Live processes (not zombies) whose process group is `pgid`, read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return sorted(pids)


class TritonServer:
    """A tritonserver process serving `repo` on loopback. Use as a context manager, or start() / stop()."""

    def __init__(self, repo: str | os.PathLike, *, http_port: int = 0, grpc_port: int = 0,
                 models: list[str] | None = None, binary: str | os.PathLike | None = None,
                 startup_timeout: float = 180.0, log_path: str | os.PathLike | None = None):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise SlimError(f"model repository {self.repo} does not exist: create it with `slim-trt deploy triton`")
        self.install = find_tritonserver(binary)
        self.requested_ports = (http_port, grpc_port)
        self.http_port, self.grpc_port = http_port, grpc_port
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else None
        manifest = read_repository(self.repo)
        self.loaded, self.skipped = plan_models(manifest, self.install.backends, has_gpu(), models)
        if not self.loaded:
            reasons = "; ".join(f"{m}: {why}" for m, why in self.skipped.items()) or "it has no model"
            raise SlimError(f"no model of {self.repo} can be served by this tritonserver ({reasons})")
        self.tensorrt_plugins = [str(self.repo / p) for p in manifest.get("tensorrt_plugins", [])]
        self._backends = {name: entry["backend"] for name, entry in manifest["models"].items()}
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._log_file = None
        self._shm_prefix = f"slimtrt{os.getpid()}{uuid.uuid4().hex[:8]}"
        self._own_log = log_path is None  # a log we created is removed by stop(), unless the start failed
        self.process_group: int | None = None

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _backend_dir(self) -> Path:
        """The wheel's backends with the stub for this Python beside libtriton_python.so (symlinks, no copies)."""
        if self.install.source != "pytriton":
            return self.install.backend_dir
        backends = self._workdir / "backends"
        for backend in self.install.backend_dir.iterdir():
            if backend.is_dir():
                (backends / backend.name).mkdir(parents=True)
                for item in backend.iterdir():
                    if item.name != "__pycache__":
                        (backends / backend.name / item.name).symlink_to(item)
        (backends / "python" / "triton_python_backend_stub").symlink_to(self.install.python_stub)
        return backends

    def _command(self, backend_dir: Path) -> list[str]:
        cmd = [str(self.install.binary), f"--model-repository={self.repo}", "--model-control-mode=explicit",
               *[f"--load-model={m}" for m in self.loaded],
               f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
               f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false",  # the metrics endpoint would listen on every interface
               f"--backend-directory={backend_dir}", "--exit-timeout-secs=5", "--strict-readiness=true",
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
               f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_DEFAULT}",
               f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_GROWTH}"]
        if self.tensorrt_plugins and any(self._backends[m] == "tensorrt" for m in self.loaded):
            cmd.append(f"--backend-config=tensorrt,plugins={';'.join(self.tensorrt_plugins)}")
        return cmd

    def start(self) -> TritonServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        self._workdir = Path(tempfile.mkdtemp(prefix="slim-trt-triton-"))
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="slim-trt-tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        try:
            backend_dir = self._backend_dir()
            for attempt in range(3):  # a port picked as free may be taken before the server binds it
                self.http_port = self.requested_ports[0] or free_port()
                self.grpc_port = self.requested_ports[1] or free_port()
                if self.http_port == self.grpc_port:
                    continue
                self._launch(backend_dir)
                try:
                    self._wait_ready()
                    return self
                except ServerError as e:
                    self._terminate()
                    if "address already in use" not in str(e).lower() or any(self.requested_ports) or attempt == 2:
                        raise
        except BaseException:
            self._own_log = False  # keep the log the error message points to
            self.stop()
            raise
        raise ServerError("could not find two free loopback ports")

    def _launch(self, backend_dir: Path) -> None:
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(self._command(backend_dir), env=_environment(self.install),
                                        stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        cwd=self._workdir, start_new_session=True,
                                        preexec_fn=_death_signal_setter())  # noqa: PLW1509 - see its docstring

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}: {self.log_error()}")
            if self._ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {self.startup_timeout:.0f} s: {self.log_error()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                if r.status != 200:
                    return False
            for model in self.loaded:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/ready", timeout=2) as r:
                    if r.status != 200:
                        return False
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.is_file() else ""

    def log_error(self) -> str:
        """The first error line of the log (the cause, not the cascade), with the log's path."""
        lines = self.log_text().splitlines()
        harmless = ("CudaDriverHelper", "pinned memory", "CUDA driver")
        errors = [ln for ln in lines if re.match(r"^E\d{4} ", ln) and not any(h in ln for h in harmless)]
        cause = errors[0] if errors else (lines[-1] if lines else "no output")
        cause = re.sub(r"^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ", "", cause).strip()
        return f"{cause} (log: {self.log_path})"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits by itself; its exit code. The log is kept for the post-mortem."""
        code = self.process.wait()
        self._own_log = False
        return code

    def _terminate(self, timeout: float = 30.0) -> None:
        """SIGINT (Triton unloads models and exits), then SIGKILL the whole group if it lingers."""
        if self.process is None:
            return
        pgid = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        deadline = time.monotonic() + 10.0
        while processes_in_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)  # python-backend stubs exit once they see the server gone
        left = processes_in_group(pgid)
        if left:
            os.killpg(pgid, signal.SIGKILL)
            while processes_in_group(pgid) and time.monotonic() < deadline + 5.0:
                time.sleep(0.1)
        self.process_group = pgid
        self.process = None
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and its stubs and remove what it left in /dev/shm and the private folder."""
        self._terminate(timeout)
        for leftover in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
