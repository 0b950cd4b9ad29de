"""Run the fuzz harnesses: `python fuzz/run.py [--target NAME|all] [--inputs N] [--engine E]`.

Engines:
    random    mutation of the corpus (bit flips, interesting integers, dictionary tokens,
              repeats, splices) plus fresh random bytes; inputs with an outcome tag not seen
              before join the in-memory corpus. Pure Python, always available.
    atheris   libFuzzer's coverage-guided engine over instrumented `agent` code, one child
              process per target (pip install atheris, or the `fuzz` extra).
    hypothesis  hypothesis' binary strategy (slow; mostly for comparison).

Per target it prints inputs, seconds, inputs/s, crashes and RSS at start/end/peak, then the
totals. Any crash (an exception outside the target's contract, a failed invariant, an input
over --timeout seconds or the process over --rss-limit-mb) saves the reproducer under
fuzz/crashes/ and the command exits 1. `--reproduce FILE` runs one saved input again.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fuzz.common import close  # noqa: E402
from fuzz.targets import TARGETS  # noqa: E402

CORPUS_DIR = FUZZ_DIR / "corpus"
CRASH_DIR = FUZZ_DIR / "crashes"
MAX_LEN = 4096
_PAGE = os.sysconf("SC_PAGE_SIZE")
_INTERESTING = (
    b"\x00", b"\xff", b"\x7f", b"\x80", b"\x01", b"\x00\x00", b"\xff\xff", b"\x7f\xff",
    b"\x80\x00", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
    b"\x00\x00\x00\x80", b"\x00\x10\x00\x00", b"\x00\x01\x00\x00",
)  # fmt: skip


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_harness(name: str) -> Any:
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    return importlib.import_module(f"fuzz.targets.{name}").Harness()


def corpus_of(harness: Any) -> list[bytes]:
    d = CORPUS_DIR / harness.name
    files = sorted(d.iterdir()) if d.is_dir() else []
    seeds = [f.read_bytes() for f in files if f.is_file()]
    return seeds or list(harness.seeds())


def write_seeds(names: list[str]) -> None:
    for name in names:
        harness = load_harness(name)
        d = CORPUS_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        for seed in harness.seeds():
            (d / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}").write_bytes(seed)
        out(f"{name}: {len(list(d.iterdir()))} corpus files")


def save_crash(name: str, kind: str, data: bytes) -> Path:
    CRASH_DIR.mkdir(exist_ok=True)
    path = CRASH_DIR / f"{name}-{kind}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


# --- the random engine ----------------------------------------------------------------------------


class Mutator:
    def __init__(self, rng: random.Random, dictionary: tuple[bytes, ...]) -> None:
        self.rng = rng
        self.tokens = tuple(dictionary) + _INTERESTING

    def fresh(self) -> bytes:
        rng = self.rng
        n = rng.choice((rng.randrange(16), rng.randrange(256), rng.randrange(MAX_LEN)))
        return rng.randbytes(n)

    def mutate(self, data: bytes, other: bytes) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3, 4, 8))):
            op = rng.randrange(11)
            n = len(buf)
            pos = rng.randrange(n + 1)
            if op == 0 and n:  # flip a bit
                i = rng.randrange(n)
                buf[i] ^= 1 << rng.randrange(8)
            elif op == 1 and n:  # random byte
                buf[rng.randrange(n)] = rng.randrange(256)
            elif op == 2:  # insert random bytes
                buf[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, rng.randrange(64))))
            elif op == 3 and n:  # delete a range
                del buf[pos : pos + rng.choice((1, 2, 4, rng.randrange(1, 256)))]
            elif op == 4:  # overwrite with an interesting value or a dictionary token
                tok = rng.choice(self.tokens)
                buf[pos : pos + len(tok)] = tok
            elif op == 5:  # insert a token
                buf[pos:pos] = rng.choice(self.tokens)
            elif op == 6 and n:  # repeat a slice (deep nesting, long runs)
                start = rng.randrange(n)
                piece = buf[start : start + rng.choice((1, 1, 2, 4, 8))]
                buf[pos:pos] = piece * rng.choice((2, 8, 64, 512, 4096))
            elif op == 7 and other:  # splice with another corpus entry
                cut = rng.randrange(len(other) + 1)
                buf[pos:] = other[cut:]
            elif op == 8 and n:  # add/subtract a small number to a byte
                i = rng.randrange(n)
                buf[i] = (buf[i] + rng.randrange(-16, 17)) & 0xFF
            elif op == 9 and n:  # copy a slice over another place
                src = rng.randrange(n)
                piece = buf[src : src + rng.randrange(1, 33)]
                buf[pos : pos + len(piece)] = piece
            elif op == 10:  # a token many times over (nesting depth, header floods)
                buf[pos:pos] = rng.choice(self.tokens) * rng.choice((16, 256, 1100, 4096))
        if len(buf) > MAX_LEN * 4:
            del buf[MAX_LEN * 4 :]
        return bytes(buf)


@dataclass
class _Watch:
    """What the watchdog thread looks at: the input being run and since when."""

    name: str = ""
    data: bytes = b""
    seq: int = 0
    started: float = 0.0
    timeout: float = 10.0
    rss_limit: float = 2048.0
    stop: threading.Event = field(default_factory=threading.Event)


def _watchdog(w: _Watch) -> None:
    last = -1
    while not w.stop.wait(0.5):
        seq = w.seq
        if seq != last:
            last, since = seq, time.monotonic()
            continue
        kind = ""
        if time.monotonic() - since > w.timeout:
            kind = "timeout"
        elif rss_mb() > w.rss_limit:
            kind = "oom"
        if kind:
            path = save_crash(w.name, kind, w.data)
            out(f"CRASH {w.name}: {kind} (input running > {w.timeout} s or RSS > "
                f"{w.rss_limit} MB); reproducer {path}")  # fmt: skip
            os._exit(1)


@dataclass
class Result:
    name: str
    engine: str
    inputs: int = 0
    seconds: float = 0.0
    crashes: int = 0
    rss_start: float = 0.0
    rss_end: float = 0.0
    rss_peak: float = 0.0
    corpus: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def run_random(
    name: str, inputs: int, seed: int, max_crashes: int, watch: _Watch, seconds: float | None
) -> Result:
    harness = load_harness(name)
    rng = random.Random(seed)
    mut = Mutator(rng, harness.dictionary)
    corpus = corpus_of(harness)
    seen: set[str] = set()
    res = Result(name, "random", rss_start=rss_mb())
    watch.name = name
    run = harness.run
    t0 = time.perf_counter()
    deadline = None if seconds is None else time.monotonic() + seconds
    i = 0
    while i < inputs:
        if i < len(corpus):
            data = corpus[i]
        elif rng.random() < 0.1:
            data = mut.fresh()
        else:
            data = mut.mutate(rng.choice(corpus), rng.choice(corpus))
        watch.data = data
        watch.seq += 1
        i += 1
        try:
            outcome = run(data)
        except Exception as exc:  # noqa: BLE001 - anything escaping the harness is a crash
            res.crashes += 1
            path = save_crash(name, "crash", data)
            out(f"CRASH {name}: {type(exc).__name__}: {str(exc)[:200]}; reproducer {path}")
            out("".join(traceback.format_exception(exc)[-6:]).rstrip())
            if res.crashes >= max_crashes:
                break
            continue
        if outcome not in seen and len(seen) < 100_000:
            seen.add(outcome)
            if len(corpus) < 4096:
                corpus.append(data)
        if deadline is not None and not i & 255 and time.monotonic() > deadline:
            break
    res.seconds = time.perf_counter() - t0
    res.inputs = i
    res.rss_end = rss_mb()
    res.rss_peak = peak_rss_mb()
    res.corpus = len(corpus)
    close(harness)
    return res


def run_hypothesis(name: str, inputs: int) -> Result:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    harness = load_harness(name)
    res = Result(name, "hypothesis", rss_start=rss_mb())
    count = 0
    failing: list[bytes] = []

    @settings(
        max_examples=inputs,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=MAX_LEN) | st.sampled_from(corpus_of(harness)))
    def prop(data: bytes) -> None:
        nonlocal count
        count += 1
        try:
            harness.run(data)
        except Exception:
            failing[:] = [data]
            raise

    t0 = time.perf_counter()
    try:
        prop()
    except Exception as exc:  # noqa: BLE001
        res.crashes = 1
        path = save_crash(name, "crash", failing[0] if failing else b"")
        out(f"CRASH {name}: {type(exc).__name__}: {str(exc)[:200]}; reproducer {path}")
    res.seconds = time.perf_counter() - t0
    res.inputs = count
    res.rss_end = rss_mb()
    res.rss_peak = peak_rss_mb()
    close(harness)
    return res


# --- the atheris engine ---------------------------------------------------------------------------


def atheris_child(name: str, argv: list[str]) -> None:
    """In a child process: instrument `agent`, then hand control to libFuzzer (never returns)."""
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports(include=["agent", "fuzz"]):
        harness = load_harness(name)
    run = harness.run

    def one(data: bytes) -> None:
        run(data)

    atheris.Setup([sys.argv[0], *argv], one)
    atheris.Fuzz()


_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_RSS = re.compile(r"rss: (\d+)Mb")
_PEAK = re.compile(r"stat::peak_rss_mb:\s+(\d+)")


def run_atheris(
    name: str, inputs: int, seed: int, timeout: float, rss_limit: float, seconds: float | None
) -> Result:
    try:
        import atheris  # noqa: F401
    except ImportError:
        raise SystemExit(
            "atheris is not installed: pip install atheris (or use --engine random)"
        ) from None
    seed_dir = CORPUS_DIR / name
    if not seed_dir.is_dir() or not any(seed_dir.iterdir()):
        write_seeds([name])
    CRASH_DIR.mkdir(exist_ok=True)
    res = Result(name, "atheris")
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
        args = [
            f"-runs={inputs}",
            f"-seed={seed or 1}",
            f"-max_len={MAX_LEN}",
            f"-timeout={int(timeout)}",
            f"-rss_limit_mb={int(rss_limit)}",
            f"-artifact_prefix={CRASH_DIR}/{name}-",
            "-print_final_stats=1",
            *([f"-max_total_time={int(seconds)}"] if seconds else []),
            work,
            str(seed_dir),
        ]
        cmd = [sys.executable, str(Path(__file__)), "--atheris-child", name, "--", *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        res.seconds = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        res.corpus = len(os.listdir(work))
    done = _DONE.findall(log)
    runs = re.findall(r"^#(\d+)\s", log, re.M)
    res.inputs = int(done[-1][0]) if done else (int(runs[-1]) if runs else 0)
    rss = [float(x) for x in _RSS.findall(log)]
    if rss:
        res.rss_start, res.rss_end = rss[0], rss[-1]
    peak = _PEAK.findall(log)
    res.rss_peak = float(peak[-1]) if peak else max(rss, default=0.0)
    if proc.returncode != 0:
        res.crashes = 1
        tail = "\n".join(log.strip().splitlines()[-25:])
        out(f"CRASH {name} (atheris exit {proc.returncode}):\n{tail}")
    return res


# --- command line ---------------------------------------------------------------------------------


def _report(r: Result) -> None:
    out(
        f"{r.name:22} {r.engine:8} inputs={r.inputs:>10,} time={r.seconds:8.1f}s "
        f"rate={r.rate:>9,.0f}/s crashes={r.crashes} rss start={r.rss_start:.0f}MB "
        f"end={r.rss_end:.0f}MB peak={r.rss_peak:.0f}MB corpus={r.corpus}"
    )


def reproduce(name: str, path: Path) -> int:
    harness = load_harness(name)
    data = path.read_bytes()
    try:
        outcome = harness.run(data)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    finally:
        close(harness)
    out(f"{name}: no crash ({outcome})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--atheris-child"]:
        atheris_child(argv[1], argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="all", help=f"all, or a comma list of: {', '.join(TARGETS)}")
    p.add_argument("--inputs", type=int, default=10_000, help="inputs per target")
    p.add_argument("--seconds", type=float, help="stop each target after this long")
    p.add_argument("--engine", choices=("random", "atheris", "hypothesis"), default="random")
    p.add_argument("--seed", type=int, default=0, help="random engine seed (0: time-based)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one input may take")
    p.add_argument("--rss-limit-mb", type=float, default=2048.0)
    p.add_argument("--max-crashes", type=int, default=1, help="per target, random engine")
    p.add_argument("--write-seeds", action="store_true", help="(re)write fuzz/corpus/ seeds")
    p.add_argument("--reproduce", type=Path, help="run one saved input of --target")
    args = p.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else args.target.split(",")
    for n in names:
        if n not in TARGETS:
            p.error(f"unknown target {n!r}")
    if args.write_seeds:
        write_seeds(names)
        return 0
    if args.reproduce:
        return reproduce(names[0], args.reproduce)
    seed = args.seed or int(time.time())
    out(f"engine={args.engine} seed={seed} inputs/target={args.inputs:,} targets={len(names)}")
    watch = _Watch(timeout=args.timeout, rss_limit=args.rss_limit_mb)
    if args.engine == "random":  # atheris children have libFuzzer's -timeout/-rss_limit_mb
        threading.Thread(target=_watchdog, args=(watch,), daemon=True).start()
    results: list[Result] = []
    for i, name in enumerate(names):
        if args.engine == "atheris":
            r = run_atheris(
                name, args.inputs, seed + i, args.timeout, args.rss_limit_mb, args.seconds
            )
        elif args.engine == "hypothesis":
            r = run_hypothesis(name, args.inputs)
        else:
            r = run_random(name, args.inputs, seed + i, args.max_crashes, watch, args.seconds)
        _report(r)
        results.append(r)
    watch.stop.set()
    total = sum(r.inputs for r in results)
    secs = sum(r.seconds for r in results)
    crashes = sum(r.crashes for r in results)
    out(f"TOTAL inputs={total:,} time={secs:.1f}s rate={total / secs if secs else 0:,.0f}/s "
        f"crashes={crashes}")  # fmt: skip
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
