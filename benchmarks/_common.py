"""Timing helpers shared by the recallprune benchmarks.

Median-of-N timing with warm-up (wall clock on the CPU, CUDA events plus synchronisation on
the GPU), memory-bandwidth baselines (``dst.copy_(src)`` for "fraction of copy bandwidth",
and an in-place ``a.add_(b)``), device naming, the flags both scripts take, the loop over
devices and CPU instruction sets (``--capability``), JSON writing and plain-text tables.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The CPU instruction sets torch's kernels (and recallprune's) are compiled for, as
# ATEN_CPU_CAPABILITY names them.
CPU_CAPABILITIES = ("default", "avx2", "avx512")
# torch's switch for transparent huge pages under its large CPU allocations (--huge-pages).
_HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def huge_pages() -> bool:
    """Whether torch backs large CPU tensors with transparent huge pages in this process."""
    return os.environ.get(_HUGE_PAGES, "").strip().lower() in ("1", "true", "yes", "on")


# Set in the processes that --capability starts: the capability they were started for.
_CAPABILITY_CHILD = "RECALLPRUNE_BENCH_CAPABILITY"

# Copy buffers larger than this (per side) add nothing: far past every cache the copy's
# bandwidth no longer depends on its size, so a larger copy is measured at this size.
MAX_COPY_BYTES_PER_SIDE = 1 << 30


@dataclass
class Timing:
    """Per-call times of one measured function, in seconds."""

    times_s: list[float]
    warmup: int
    timer: str  # "perf_counter" or "cuda_event"
    notes: list[str] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def repeats(self) -> int:
        return len(self.times_s)

    @classmethod
    def merge(cls, timings: Sequence[Timing]) -> Timing:
        """One timing from several rounds of the same function."""
        notes: list[str] = []
        for t in timings:
            notes.extend(n for n in t.notes if n not in notes)
        return cls(
            [x for t in timings for x in t.times_s],
            sum(t.warmup for t in timings),
            timings[0].timer,
            notes,
        )

    def summary(self) -> dict[str, Any]:
        times = sorted(self.times_s)
        return {
            "median_ms": self.median_s * 1e3,
            "min_ms": times[0] * 1e3,
            "max_ms": times[-1] * 1e3,
            "iqr_ms": (_quantile(times, 0.75) - _quantile(times, 0.25)) * 1e3,
            "repeats": self.repeats,
            "warmup": self.warmup,  # untimed calls in all
            "timer": self.timer,
            "notes": list(self.notes),
        }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    repeats: int,
    warmup: int,
    max_seconds: float | None = None,
    min_repeats: int = 5,
) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls.

    On CUDA every call is bracketed by CUDA events (the device is synchronised before the
    first and after the last); on the CPU by ``time.perf_counter``. When ``max_seconds`` is
    given, the number of repeats is lowered (never below ``min_repeats``) so that the timed
    calls take about that long in all: slow cases then run fewer repeats.
    """
    device = torch.device(device)
    notes: list[str] = []
    warmup_times = []
    for _ in range(max(warmup, 1 if max_seconds is not None else 0)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        warmup_times.append(time.perf_counter() - start)

    if max_seconds is not None and repeats > min_repeats:
        # The fastest warm-up call sets the budget: one slow spell must not cut the repeats.
        estimate = min(warmup_times)
        affordable = int(max_seconds / max(estimate, 1e-9))
        capped = max(min_repeats, min(repeats, affordable))
        if capped < repeats:
            notes.append(f"repeats lowered from {repeats} to {capped} (max_seconds={max_seconds})")
            repeats = capped

    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        synchronize(device)
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        synchronize(device)
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
        return Timing(times, len(warmup_times), "cuda_event", notes)

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(times, len(warmup_times), "perf_counter", notes)


def bandwidth_fn(
    nbytes_moved: int, device: torch.device | str, kind: str = "copy"
) -> tuple[Callable[[], None], int, list[str]]:
    """A plain memory-bound op over flat buffers that move ``nbytes_moved``.

    ``kind="copy"``: ``dst.copy_(src)`` over byte buffers of half the bytes each (read
    ``src``, write ``dst``). ``kind="add_"``: ``a.add_(b)`` over fp32 buffers of a third
    each (read ``a`` and ``b``, write ``a``): an in-place read-modify-write like an
    optimizer step, which, unlike the copy's store to ``dst``, pays no write-allocate read
    on CPUs. Buffers are capped at ``MAX_COPY_BYTES_PER_SIDE``.

    Returns ``(fn, bytes_moved, notes)``; bandwidth = ``bytes_moved`` / time of ``fn()``.
    """
    if kind not in ("copy", "add_"):
        raise ValueError(f"kind must be 'copy' or 'add_', got {kind!r}")
    device = torch.device(device)
    arrays = 2 if kind == "copy" else 3
    side = max(4, nbytes_moved // arrays) // 4 * 4
    notes = []
    if side > MAX_COPY_BYTES_PER_SIDE:
        notes.append(
            f"buffers capped at {MAX_COPY_BYTES_PER_SIDE} bytes each (asked for {side}); "
            "bandwidth no longer depends on the size there"
        )
        side = MAX_COPY_BYTES_PER_SIDE
    if kind == "copy":
        a = torch.ones(side, dtype=torch.uint8, device=device)
        b = torch.zeros_like(a)

        def fn() -> None:
            b.copy_(a)

    else:
        a = torch.ones(side // 4, dtype=torch.float32, device=device)
        b = torch.zeros_like(a)

        def fn() -> None:
            a.add_(b)

    return fn, arrays * side, notes


def bandwidth_baseline(
    nbytes_moved: int,
    device: torch.device | str,
    *,
    kind: str = "copy",
    repeats: int,
    warmup: int,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Time ``bandwidth_fn(...)``: its timing summary plus ``bytes_moved`` and ``gbps``."""
    fn, moved, notes = bandwidth_fn(nbytes_moved, device, kind)
    timing = time_fn(fn, device, repeats=repeats, warmup=warmup, max_seconds=max_seconds)
    timing.notes.extend(notes)
    return {
        **timing.summary(),
        "kind": kind,
        "bytes_moved": moved,
        "gbps": moved / timing.median_s / 1e9,
    }


def time_cases(
    builders: Mapping[str, Callable[[], Callable[[], object]]],
    device: torch.device | str,
    args: Any,
    **options: Any,
) -> tuple[dict[str, Timing], dict[str, str]]:
    """:func:`time_interleaved` with the timing arguments of ``args`` (rounds, repeats,
    warmup, max_seconds: see :func:`add_timing_arguments`) and any other ``options``."""
    return time_interleaved(
        builders,
        device,
        rounds=args.rounds,
        repeats=args.repeats,
        warmup=args.warmup,
        max_seconds=args.max_seconds,
        **options,
    )


def time_interleaved(
    builders: Mapping[str, Callable[[], Callable[[], object]]],
    device: torch.device | str,
    *,
    rounds: int,
    repeats: int,
    warmup: int,
    max_seconds: float | None = None,
    min_repeats: int = 5,
    after_first_round: Callable[[str, Callable[[], object]], None] | None = None,
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Time several cases round-robin, so that a slow spell of a shared machine hits all.

    ``builders[name]()`` sets a case up afresh and returns the function to time; it is
    called once per round, and the function is dropped after its round (freeing its state
    before the next case is built). Each round times every case with ``ceil(repeats /
    rounds)`` calls after ``ceil(warmup / rounds)`` warm-up calls (``max_seconds`` and
    ``min_repeats`` likewise split, see :func:`time_fn`); the order of the cases rotates
    from round to round. ``after_first_round(name, fn)`` runs after a case's first round.

    Returns ``(timings, errors)``: the merged timing of every case that ran, and the error
    message of every case whose builder raised (it is not tried again).
    """
    names = list(builders)
    per_round = {
        "repeats": math.ceil(repeats / rounds),
        "warmup": math.ceil(warmup / rounds),
        "max_seconds": None if max_seconds is None else max_seconds / rounds,
        "min_repeats": math.ceil(min_repeats / rounds),
    }
    parts: dict[str, list[Timing]] = {name: [] for name in names}
    errors: dict[str, str] = {}
    for r in range(rounds):
        shift = (r * len(names)) // rounds
        for name in names[shift:] + names[:shift]:
            if name in errors:
                continue
            try:
                fn = builders[name]()
            except (RuntimeError, TypeError, ValueError) as error:
                errors[name] = f"{type(error).__name__}: {error}"
                continue
            parts[name].append(time_fn(fn, device, **per_round))
            if r == 0 and after_first_round is not None:
                after_first_round(name, fn)
            del fn
    timings = {name: Timing.merge(p) for name, p in parts.items() if p}
    return timings, errors


def device_name(device: torch.device | str) -> str:
    """The CPU model (``model name`` in /proc/cpuinfo) or the CUDA device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_label(device: torch.device | str) -> str:
    """``"AMD EPYC / cpu, avx2"`` or ``"NVIDIA H100 / cuda"``: for table titles."""
    device = torch.device(device)
    label = f"{device_name(device)} / {device}"
    return f"{label}, {cpu_capability()}" if device.type == "cpu" else label


def cpu_model() -> str:
    """The CPU's ``model name`` from /proc/cpuinfo (or what ``platform`` knows)."""
    return device_name("cpu")


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels use in this process, lower case ("default",
    "avx2", "avx512"): the best the CPU has, unless ATEN_CPU_CAPABILITY asks for less."""
    return torch.backends.cpu.get_cpu_capability().lower()


def supported_cpu_capabilities() -> list[str]:
    """The entries of ``CPU_CAPABILITIES`` that torch can use on this CPU.

    torch reads ATEN_CPU_CAPABILITY once, when it loads, and falls back to a lesser set when
    the CPU lacks the one asked for: each set is tried in a fresh interpreter.
    """
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    found = []
    for capability in CPU_CAPABILITIES:
        result = subprocess.run(
            [sys.executable, "-c", probe],
            env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
            capture_output=True,
            text=True,
            check=True,
        )
        if result.stdout.strip().lower() == capability:
            found.append(capability)
    return found


def slugify(text: str) -> str:
    """``"Intel(R) Xeon(R) Processor"`` -> ``"intel-xeon-processor"``."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def environment(device: torch.device | str) -> dict[str, Any]:
    """What a result depends on besides the code: versions, device, threads, date."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "num_threads": torch.get_num_threads(),
        "huge_pages": huge_pages(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            cuda=torch.version.cuda,
            gpu_memory_gib=props.total_memory / 2**30,
            gpu_multiprocessors=props.multi_processor_count,
        )
    return info


def git_state(path: Path | str | None = None) -> dict[str, Any]:
    """The commit of the repository holding ``path`` (this folder) and whether it is dirty,
    results aside (a run over several capabilities writes one before measuring the next)."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ":(top)",
                ":(top,exclude)benchmarks/results",
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(status.strip())}


def write_json(path: Path | str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: text left-aligned, numbers right-aligned, ``None`` as ``-``."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in text)
    return "\n".join(out)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n{title}")
    print(format_table(headers, rows), flush=True)


def check_no_host_sync(fn: Callable[[], object], device: torch.device | str) -> bool | None:
    """CUDA: whether one call of ``fn()`` runs under ``set_sync_debug_mode("error")``
    without raising (``None`` on other devices)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode(0)
        synchronize(device)


def kernel_benchmark_args(
    parse_args: Callable[[list[str]], Any], argv: Sequence[str] | None
) -> tuple[list[str], Any]:
    """A benchmark of the compiled kernels starting: its arguments (``argv``, default the
    command line's) parsed, the kernels required, ``--threads`` applied. Returns ``(argv,
    args)``."""
    from recallprune.ops import has_ops, load_error

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not has_ops():
        raise SystemExit(f"recallprune's compiled kernels did not load: {load_error()}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return argv, args


def extension_state() -> dict[str, Any]:
    """Which build of recallprune._C ran: its path, modification time and hash."""
    import hashlib

    import recallprune

    try:
        from recallprune import _C
    except ImportError as error:  # a script that also runs on the pure-torch fallback
        return {"recallprune": recallprune.__version__, "extension": None, "error": str(error)}
    path = Path(_C.__file__)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
    return {
        "recallprune": recallprune.__version__,
        "extension": str(path),
        "extension_sha256": digest,
        "extension_mtime": mtime.isoformat(timespec="seconds"),
    }


def devices_for(choice: str) -> list[torch.device]:
    """``"cpu"``, ``"cuda"`` (exits if CUDA is missing) or ``"all"`` (CPU, plus CUDA when
    available)."""
    if choice == "cpu":
        return [torch.device("cpu")]
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        return [torch.device("cuda")]
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def add_timing_arguments(parser, unit: str, name: str, defaults: dict[str, float]) -> None:
    """The flags both benchmarks share. ``unit``: what one timed call is ("steps", "calls");
    ``name``: the JSON's stem; ``defaults``: repeats, warmup and max_seconds of a full run."""
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "all"),
        default="all",
        help="cpu, cuda, or all (default: cpu, plus cuda when available)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed {unit} per method, in all (default {defaults['repeats']})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed {unit}, split over the rounds (default {defaults['warmup']})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="round-robin rounds over the methods; the repeats are split over them, so a slow "
        "spell of a shared machine hits every method alike (default 3)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help=f"lower the repeats of a slow method (never below 5) so that its timed {unit} "
        f"take about this long in all (default {defaults['max_seconds']}; 0: never lower)",
    )
    parser.add_argument(
        "--capability",
        choices=(*CPU_CAPABILITIES, "all"),
        default=None,
        help="measure the CPU with this instruction set of torch's (ATEN_CPU_CAPABILITY), or "
        "with each one the CPU has ('all'), each in a fresh process of this script; other "
        "devices are measured once (default: the set torch picks, in this process)",
    )
    parser.add_argument(
        "--huge-pages",
        action="store_true",
        help=f"back torch's large CPU tensors with transparent huge pages ({_HUGE_PAGES}=1, "
        "in a fresh process): fewer TLB misses, and ratios that do not move with where the "
        "pages of each method's tensors fall; results go to files ending in -thp",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repeats: a smoke run"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON path for all devices (default: benchmarks/results/{name}-<device>.json "
        "per device, the CPU's with -<capability>, -quick appended with --quick); with "
        "--capability, each capability's CPU run goes to this path with -<capability> added",
    )


def resolve_timing_arguments(args, parser, defaults: dict[str, float], quick_max_seconds: float):
    """Fill the timing flags left unset (smaller values with --quick) and check them."""
    if args.repeats is None:
        args.repeats = 3 if args.quick else int(defaults["repeats"])
    if args.warmup is None:
        args.warmup = 1 if args.quick else int(defaults["warmup"])
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.max_seconds is None:
        args.max_seconds = quick_max_seconds if args.quick else defaults["max_seconds"]
    if args.max_seconds <= 0:
        args.max_seconds = None
    if args.repeats < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--repeats and --rounds must be >= 1 and --warmup >= 0")


def run_devices(
    args,
    argv: Sequence[str],
    script: Path | str,
    name: str,
    measure: Callable[[torch.device], dict[str, Any]],
    payload: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> list[Path]:
    """Measure every device that ``--device`` names and write the JSON; return the files.

    ``measure(device)`` returns the device's results (merged into its run, after its
    environment); ``payload(runs)`` wraps runs into a file's content. With
    ``--capability``, the CPU is measured by fresh processes of ``script`` (run with
    ``argv``), one per instruction set, with ATEN_CPU_CAPABILITY set; other devices are
    measured here, once. File names: see ``result_path``.
    """
    if getattr(args, "huge_pages", False) and not huge_pages():
        # torch reads the switch once, at its first large allocation: start afresh with it.
        os.environ[_HUGE_PAGES] = "1"
        os.execv(sys.executable, [sys.executable, str(script), *argv])
    child_capability = os.environ.get(_CAPABILITY_CHILD)
    written: list[Path] = []
    if child_capability is not None:
        if cpu_capability() != child_capability:
            raise SystemExit(
                f"--capability {child_capability}: torch uses {cpu_capability()} on this CPU "
                f"({cpu_model()}), which lacks {child_capability}"
            )
        devices = [torch.device("cpu")]
    else:
        devices = devices_for(args.device)
        if args.capability is not None and any(d.type == "cpu" for d in devices):
            written += _run_capabilities(args, argv, script, name)
            devices = [d for d in devices if d.type != "cpu"]

    runs = []
    for device in devices:
        started = time.perf_counter()
        run: dict[str, Any] = {
            "environment": {**environment(device), **git_state(), **extension_state()}
        }
        run.update(measure(device))
        run["seconds"] = time.perf_counter() - started
        runs.append(run)
        if args.out is None:
            path = result_path(name, device, cpu_capability(), args.quick, None)
            written.append(write_json(path, payload([run])))
    if args.out is not None and runs:
        path = result_path(name, devices[0], child_capability, args.quick, args.out)
        written.append(write_json(path, payload(runs)))
    return written


def result_path(
    name: str, device: torch.device, capability: str | None, quick: bool, out: Path | None
) -> Path:
    """Where a run's JSON goes. Default: ``results/{name}-<device>[-<capability>][-quick]
    .json``, the capability for the CPU only; with ``--out``, that path, with
    ``-<capability>`` added for a run that ``--capability`` started."""
    if out is not None:
        out = Path(out)
        return out if capability is None else out.with_name(f"{out.stem}-{capability}{out.suffix}")
    parts = [name, slugify(device_name(device))]
    if device.type == "cpu" and capability is not None:
        parts.append(slugify(capability))
    if device.type == "cpu" and huge_pages():
        parts.append("thp")
    if quick:
        parts.append("quick")
    return RESULTS_DIR / ("-".join(parts) + ".json")


def _run_capabilities(args, argv: Sequence[str], script: Path | str, name: str) -> list[Path]:
    """Run ``script argv`` once per capability that ``--capability`` names and the CPU has;
    return the files they wrote."""
    supported = supported_cpu_capabilities()
    if args.capability == "all":
        chosen = supported
    elif args.capability in supported:
        chosen = [args.capability]
    else:
        raise SystemExit(
            f"--capability {args.capability}: this CPU ({cpu_model()}) does not have it; "
            f"it has {', '.join(supported)}"
        )
    written = []
    for capability in chosen:
        print(f"\n== CPU, {capability} ({cpu_model()}) ==", flush=True)
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, _CAPABILITY_CHILD: capability}
        result = subprocess.run([sys.executable, str(script), *argv], env=env, check=False)
        if result.returncode != 0:
            raise SystemExit(f"the {capability} run failed (exit status {result.returncode})")
        cpu = torch.device("cpu")
        written.append(result_path(name, cpu, capability, args.quick, args.out))
    return written
