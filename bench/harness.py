"""What the benchmarks in bench/ share: paths, row selection, the machine and its load, versions, the evaluation
windows, peak RSS, the peer libraries' venvs (bench/.venv-<peer>) and their logs, and the results file (JSON +
Markdown + PNG, rewritten atomically after every row so that an interrupted run resumes where it stopped).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from slim_trt.errors import SlimError  # noqa: E402

BENCH = Path(__file__).resolve().parent
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt"


# ----------------------------------------------------------------------------------------------------------------
# Names and settings


def portable_path(path: str) -> str:
    """A text file's path relative to the checkout when it lives beside it (../shared/...), so the settings
    fingerprint is the same in every clone; absolute otherwise. The path is taken as written before symlinks are
    resolved, so a checkout whose ../shared is a link to the data (a git worktree) records the same ../shared
    path as one that sits beside the data."""
    for p in (Path(os.path.abspath(path)), Path(path).resolve()):
        try:
            p.relative_to(REPO.parent)
        except ValueError:
            continue
        return os.path.relpath(p, REPO)
    return str(Path(path).resolve())


def model_tag(model: str) -> str:
    return Path(model).name if os.sep in model or Path(model).is_dir() else model.replace("/", "_")


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def row_parser(prog: str, doc: str, rows: tuple, name_width: int = 24):
    """An argparse parser for a benchmark whose rows are selected by --rows (see select_rows); its help lists them."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="rows:\n" + "\n".join(f"  {r.number:>2} {r.name:<{name_width}} {r.label}"
                                                              for r in rows))
    p.add_argument("--rows", default="all", help="'all' or a comma list of numbers/names [default: all]")
    return p


def select_rows(spec: str, rows: tuple) -> list:
    """'all', or a comma list of row numbers, names or keys ('1,slim-lora,9-slim-lora-8bit'), in the order given
    (so the rows that matter most can go first). Rows need .number, .name and .key."""
    if spec.strip().lower() == "all":
        return list(rows)
    by_number = {str(r.number): r for r in rows}
    by_name = {r.name: r for r in rows} | {r.key: r for r in rows}
    chosen: list = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        row = by_number.get(item) or by_name.get(item.lower())
        if row is None:
            raise SlimError(f"unknown row {item!r} in --rows: use numbers 1-{len(rows)} or names "
                            f"({', '.join(r.name for r in rows)})")
        if row not in chosen:
            chosen.append(row)
    if not chosen:
        raise SlimError("--rows is empty: give 'all' or a comma list such as 1,7,8")
    return chosen


def cli_main(parser, body, argv: list[str] | None = None) -> int:
    """Parse argv and run body(args); bad input (SlimError) is one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return body(args)
    except SlimError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_positive(**values: int) -> None:
    """check_positive(batch_size=0) -> SlimError naming --batch-size."""
    for name, v in values.items():
        if v < 1:
            raise SlimError(f"bad --{name.replace('_', '-')} {v}: it must be >= 1")


def check_text_files(**files: str) -> None:
    for flag, f in files.items():
        if not Path(f).is_file():
            raise SlimError(f"--{flag} {f}: no such file (the WikiText-2 files live in ../shared/data/wikitext-2/)")


def evaluation_windows(tokenizer, data: str, seqlen: int, windows: int | None):
    """The evaluation windows every row of every benchmark scores: the first `windows` non-overlapping windows of
    `seqlen` tokens of the text file (all of them when None), BOS first. LongTensor [n, seqlen]."""
    from slim_trt.data.windows import eval_windows, load_text

    return eval_windows(tokenizer, load_text(data), seqlen, windows)


# ----------------------------------------------------------------------------------------------------------------
# The machine


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where the file does not say."""
    try:
        cores, phys = set(), None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":", 1)[1].strip()
            elif line.startswith("core id"):
                cores.add((phys, line.split(":", 1)[1].strip()))
        return len(cores) or None
    except OSError:
        return None


def machine() -> dict:
    """Where the numbers were measured; the load average is read now (record it again after the work)."""
    try:
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")) / 2**20
    except (OSError, StopIteration):
        mem = None
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gb": round(mem, 1) if mem else None, "os": platform.platform(), "loadavg": loadavg()}


def versions(*packages: str) -> dict:
    """Python, torch, transformers and slim-trt (with the checkout's commit), plus `packages` when installed."""
    import importlib.metadata as md

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    out = {"python": platform.python_version(), "torch": ver("torch"), "transformers": ver("transformers"),
           "slim_trt": ver("slim-trt") or ver("slim_trt"), "slim_trt_commit": commit}
    out.update({p: ver(p) for p in packages})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Peers: other libraries run in their own venvs (bench/.venv-<peer>, from bench/peers/requirements-<peer>.txt)


class RowFailed(Exception):
    """A row that could not be measured: `error` goes into the row's record, with the log's last lines and the
    worker's own report when there is one."""

    def __init__(self, error: str, log_tail: str | None = None, report: dict | None = None):
        super().__init__(error)
        self.error, self.log_tail, self.report = error, log_tail, report


def venv_python(venv_dir: Path | str, peer: str) -> Path:
    """Where the Python of the peer's venv under `venv_dir` is (whether or not it exists)."""
    return Path(venv_dir) / f".venv-{peer}" / "bin" / "python"


def peer_python(venv_dir: Path | str, peer: str, make_target: str) -> Path:
    """The Python of the peer's venv under `venv_dir`; RowFailed saying how to make it when it is not there."""
    py = venv_python(venv_dir, peer)
    if not py.exists():
        req = BENCH / "peers" / f"requirements-{peer}.txt"
        raise RowFailed(f"no venv for {peer} at {py.parent.parent}: create it with `make {make_target}` "
                        f"(python3 -m venv {py.parent.parent} && {py} -m pip install -r {req})")
    return py


def peer_env() -> dict:
    """A peer's environment: offline (everything it reads is on disk already), none of this checkout's modules."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": ""}


def venv_version(py: Path, package: str) -> str | None:
    """`package`'s version in the venv of the interpreter `py`, read without importing it (None if absent)."""
    try:
        r = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                           capture_output=True, text=True, timeout=60, check=False)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def log_tail(log: Path, n: int = 15) -> str:
    """The last `n` lines of a log ("" when it cannot be read)."""
    try:
        return "\n".join(Path(log).read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------------------------
# Memory


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next reading covers one row only (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """This process's peak RSS in GiB (VmHWM, which reset_peak_rss resets; ru_maxrss where /proc has none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------------------------
# Results file


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; results are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ResultsFile:
    """<out>/<benchmark>_<tag>.json (or <benchmark>.json) with its .md and .png siblings, rewritten atomically
    after every row.

    Rows made with other settings are refused unless `redo` (which starts the file afresh). Subclasses give the
    row order and the Markdown/PNG renderings, and may add derived fields in `derive`.
    """

    def __init__(self, out_dir: Path, benchmark: str, tag: str, settings: dict, redo: bool):
        # tag "": a benchmark that is not about one model (bench/scaling.py) writes <benchmark>.json
        self.json_path = Path(out_dir) / (f"{benchmark}_{tag}.json" if tag else f"{benchmark}.json")
        self.md_path = self.json_path.with_suffix(".md")
        self.png_path = self.json_path.with_suffix(".png")
        self.settings = settings
        fp = fingerprint(settings)
        data = json.loads(self.json_path.read_text()) if self.json_path.exists() else None
        if data and data.get("settings_fingerprint") != fp and not redo and data.get("rows"):
            raise SlimError(f"{self.json_path} holds results made with other settings ({data.get('settings')}): "
                            f"pass --redo to replace them, or choose another --out")
        if not data or data.get("settings_fingerprint") != fp:
            data = {"rows": {}}
        data.update({"benchmark": benchmark, "model": tag, "settings": settings, "settings_fingerprint": fp})
        self.data = data

    @property
    def rows(self) -> dict:
        return self.data["rows"]

    def put(self, key: str, record: dict) -> None:
        self.data["rows"][key] = record
        self.write()

    def todo(self, rows: list, redo: bool) -> list:
        """The rows still to run (all of them with redo); says which are skipped."""
        todo = [r for r in rows if redo or not self.done(r)]
        for r in rows:
            if r not in todo:
                print(f"[{r.number}] {r.name}: already in {self.json_path}, skipped (--redo to recompute)")
        return todo

    # hooks
    def done(self, row) -> bool:
        return row.key in self.rows

    def order(self) -> list[str]:
        return list(self.data["rows"])

    def derive(self) -> None:
        """Fill fields computed from several rows (called before every write)."""

    def markdown(self) -> str:
        raise NotImplementedError

    def plot(self) -> bytes | None:
        return None

    def write(self) -> None:
        self.derive()
        rows = self.data["rows"]
        ordered = {k: rows[k] for k in self.order() if k in rows}
        ordered.update({k: v for k, v in rows.items() if k not in ordered})
        # metadata first, the (long) rows last, so the file reads top-down
        self.data = {**{k: v for k, v in self.data.items() if k != "rows"}, "rows": ordered}
        atomic_write(self.json_path, (json.dumps(self.data, indent=1) + "\n").encode())
        atomic_write(self.md_path, self.markdown().encode())
        png = self.plot()
        if png:
            atomic_write(self.png_path, png)


def figure_png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(x, nd: int = 2) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))
