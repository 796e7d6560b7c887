"""What a `dpo` command shows, and what it keeps in the run's log file.

Quiet by default: the terminal shows our own lines (progress, stage summaries, our warnings, the error line)
and nothing from Ray or the libraries below ERROR: not Ray Train's `Reporting training result N`, nor
deprecation warnings, nor `core_worker.cc` messages, nor Ray Data's progress. `--verbose` (or
`RAYDPO_LOG_LEVEL=INFO`; `WARNING` shows the libraries' warnings only) shows everything as before.
Whatever is shown or not, the log file `<run_dir>/logs/dpo-<time>-<pid>.log` keeps it all: our lines, the
libraries' records, Python warnings, every line the Ray workers printed, and the full traceback of a failure.

Three places where chatter comes from, and how each is held back:
  - Python logging in this process: one console handler of ours passes our loggers (`pipeline.*`) at INFO and
    others at the chosen level; the consoles that Ray and Ray Data attach to their own loggers get a gate with
    the same rule (`gate_library_consoles`, again after each import that adds one).
  - the Ray workers' stdout and stderr, which Ray forwards to this process: the forwarding handler is
    replaced by one that writes every line to the log file and prints only ours (lines that start with a stage
    name, such as `train step 3/10: ...`). It uses Ray's stream dispatcher (`ray._private.ray_logging`); where
    that is missing, Ray's own forwarding stays.
  - Ray's C++ processes and the libraries' progress bars: environment variables set before Ray starts
    (`RAY_BACKEND_LOG_LEVEL`, `HF_HUB_DISABLE_PROGRESS_BARS`, `TRANSFORMERS_VERBOSITY`), never over a value the
    user set.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import sys
import tempfile
import threading
import time

OURS = re.compile(r"^(demo|tokenize|score|train|evaluate|sweep|run)( step \d+/\d+)?: ")
# A line of Ray's C++ logging: "[2026-12-07 04:12:21,036 E 5363 5363] core_worker.cc:2465: ..."
NATIVE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([DIWEF]) \d+ \d+\] ")
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
QUIET_ENV = {
    # Not RAY_BACKEND_LOG_LEVEL: Ray's C++ side announces that variable on stderr in every process it starts.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # "Writing model shards", downloads
    "TRANSFORMERS_VERBOSITY": "error",
}
FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _State:
    library_level = logging.ERROR  # below this, the libraries' records stay off the terminal
    log_path: str | None = None
    file_handler: logging.Handler | None = None


STATE = _State()


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "pipeline" or record.name.startswith("pipeline.") or record.name == "__main__"


class _Gate(logging.Filter):
    """Passes our records at INFO and up, and the libraries' at the chosen level and up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= (logging.INFO if _ours(record) else STATE.library_level)


class _Console(logging.Handler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a job's log)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a logging call must never raise
            self.handleError(record)


def library_level(*, verbose: bool) -> int:
    """The level at which the libraries' records reach the terminal: --verbose or RAYDPO_LOG_LEVEL."""
    if verbose:
        return logging.INFO
    name = os.environ.get("RAYDPO_LOG_LEVEL", "").upper()
    return LEVELS.get(name, logging.ERROR)


def setup(*, verbose: bool = False) -> None:
    """Configure this process's logging for a `dpo` command (again on each call: tests run several)."""
    STATE.library_level = library_level(verbose=verbose)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in [h for h in root.handlers if isinstance(h, _Console)]:
        root.removeHandler(handler)
    console = _Console()
    console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(_Gate())
    root.addHandler(console)
    logging.captureWarnings(True)  # warnings become records of "py.warnings": kept in the file, gated here
    if STATE.library_level > logging.INFO:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)
    gate_library_consoles()


def writes_to_a_console(handler: logging.Handler) -> bool:
    """A stream handler over a real file descriptor (a terminal, a pipe): what a library prints to. A handler
    over an in-memory stream (a test harness capturing records, such as pytest's) is no console: gating it
    would hide records from whoever collects them."""
    stream = getattr(handler, "stream", None)
    if not isinstance(handler, logging.StreamHandler) or stream is None:
        return False
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return False
    return True


def gate_library_consoles() -> None:
    """Put the gate on every console handler the libraries attached to their own loggers (Ray's, Ray Data's)
    and hand their records to the log file too (those loggers do not propagate to the root)."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, (_Console, logging.FileHandler)) or not writes_to_a_console(handler):
                continue
            if not any(isinstance(f, _Gate) for f in handler.filters):
                handler.addFilter(_Gate())
        file_handler = STATE.file_handler
        if (
            logger.handlers
            and not logger.propagate
            and file_handler is not None
            and file_handler not in logger.handlers
        ):
            logger.addHandler(file_handler)


def keep_log(run_dir: str) -> str:
    """Start this command's log file under `<run_dir>/logs/` (a local run directory) or the temporary folder
    (an object store, or a run directory that cannot be written); returns its path."""
    close_log()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"dpo-{stamp}-{os.getpid()}.log"
    folder = os.path.join(run_dir, "logs") if "://" not in run_dir else None
    path = None
    for candidate in (folder, os.path.join(tempfile.gettempdir(), "raydpo-logs")):
        if candidate is None:
            continue
        try:
            os.makedirs(candidate, exist_ok=True)
            handler = logging.FileHandler(os.path.join(candidate, name), encoding="utf-8", delay=False)
        except OSError:
            continue
        path = os.path.join(candidate, name)
        break
    if path is None:
        return ""
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    STATE.file_handler, STATE.log_path = handler, path
    gate_library_consoles()
    return path


def close_log() -> None:
    """Stop writing the log file (at the end of a command; tests run several in one process)."""
    NATIVE_LINES.stop()
    handler = STATE.file_handler
    if handler is None:
        return
    for logger in [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]:
        if handler in logger.handlers:
            logger.removeHandler(handler)
    handler.close()
    STATE.file_handler = None


def log_exception(err: BaseException) -> None:
    """The full traceback of a failure, into the log file only."""
    if STATE.file_handler is not None:
        record = logging.getLogger("pipeline.cli").makeRecord(
            "pipeline.cli", logging.ERROR, __file__, 0, "the command failed", (), (type(err), err, err.__traceback__)
        )
        STATE.file_handler.handle(record)


def _keep(name: str, message: str, *args) -> None:
    if STATE.file_handler is not None:
        STATE.file_handler.handle(logging.getLogger(name).makeRecord(name, logging.INFO, "", 0, message, args, None))


def _worker_lines(data: dict, ignore_prefix: bool = False) -> None:
    """Ray's forwarded worker output (and the raylet's pushed messages): every line into the log file; onto
    the terminal, ours, and the raylet's messages that are not warnings (a worker killed for memory)."""
    who = data.get("actor_name") or data.get("task_name") or data.get("pid")
    for line in data.get("lines", []):
        _keep("ray.workers", "(%s pid=%s) %s", who, data.get("pid"), line)
        pushed = data.get("pid") == "raylet" and not line.lstrip().startswith("WARNING")
        if OURS.match(line) or (pushed and not NATIVE.match(line.encode())):
            print(line, file=sys.stderr if data.get("is_err") else sys.stdout, flush=True)


def take_worker_output() -> None:
    """After ray.init, in quiet mode: the workers' forwarded output and the raylet's pushed messages go
    through `_worker_lines`, and this process's own stderr through `NativeLines` (Ray's C++ side writes
    there directly)."""
    gate_library_consoles()
    if STATE.library_level <= logging.INFO:
        return  # --verbose: Ray prints them, with its prefixes, as always
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its own forwarding stays
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("raydpo_worker_lines")
    dispatcher.add_handler("raydpo_worker_lines", _worker_lines)
    ray_worker.print_to_stdstream = _worker_lines  # what the raylet's error messages are printed with
    NATIVE_LINES.start()


class NativeLines:
    """This process's file descriptor 2 through a pipe: lines of Ray's C++ logging (below FATAL) go to the log
    file, everything else on to the real stderr at once. Started after ray.init, so that the processes Ray
    starts keep the real stderr; `stop` (at the end of a command) puts the real one back."""

    def __init__(self) -> None:
        self.real: int | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.real is not None:
            return
        sys.stderr.flush()
        self.real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        if faulthandler.is_enabled():  # a native crash's stack must not wait on a thread that dies with it
            faulthandler.enable(file=os.fdopen(os.dup(self.real), "w"), all_threads=True)
        self.thread = threading.Thread(target=self._pump, args=(read, self.real), daemon=True, name="raydpo-stderr")
        self.thread.start()

    @staticmethod
    def _pump(read: int, real: int) -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                found = NATIVE.match(line)
                if found and found.group(1) != b"F":
                    _keep("ray.native", "%s", line.decode("utf-8", "replace").rstrip("\n"))
                else:
                    os.write(real, line)

    def stop(self) -> None:
        if self.real is None:
            return
        sys.stderr.flush()
        os.dup2(self.real, 2)  # the pipe's last writer gone: the pump reads to the end and stops
        if self.thread is not None:
            self.thread.join(timeout=2.0)
        os.close(self.real)
        self.real, self.thread = None, None


NATIVE_LINES = NativeLines()
