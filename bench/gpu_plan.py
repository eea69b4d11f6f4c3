"""The GPU run as a plan of steps that each fit one device command: what bench/gpu_run.sh runs.

    bash bench/gpu_run.sh --step 1[,2[,3]] OUT_DIR [--pack] [--only PART,...] [--budget SECONDS]
    bash bench/gpu_run.sh --dry-run [OUT_DIR]          # every step's commands and files, nothing run
    bash bench/gpu_run.sh --collect FILES_DIR [DEST]   # here: a packed run's files -> bench/results/<run>

A lent GPU gives a session 15 minutes of device time (its start included) and 10 minutes per command, and
returns at most 8 files from $OUT. So the run is split into steps, ordered by value, each ending within 8
minutes (the step stops itself at its time limit), each writing its results as it goes: a step cut short still
leaves what it measured.

1. build (in place), the CUDA smoke test of every op family (tests/test_gpu_smoke.py, in parallel) with the
   launch plans against the real driver, and the launch-plan check under the stand-in driver;
2. the benchmark's most informative rows, one bench/run.py per group (results.csv is written per run): the import-
   to-first-step time on a cold Triton cache, the model suite at batch 64, the conv blocks with their pool at
   batch 64, the cnn suite (ResNet-18 and the CIFAR-10 net, bf16 autocast, batch 256: a training step and
   inference, eager, dlkern.convert and torch.compile), then the model suite at batch 1024, the host suite, the
   activations at 2^24 and 2^26, the conv blocks at batch 1024 (steps 1 and 2 in one command reach the cnn
   suite; the parts after it need a second command: ``--step 2 --only ...``);
3. the whole test suite in parallel: the CUDA tests first, then the rest.

Files in OUT_DIR (with ``--pack`` at most 8, so that all of them come back from a lent machine): ``env.txt``
(versions, GPU, commit, build), ``stepN.log`` (everything a step printed, written as it runs),
``first_step.txt``, ``results.csv`` (every finished benchmark part's rows) and ``targets.md`` (the targets over
them), and the details: ``OUT_DIR/details/`` (build log, each benchmark part's own folder with its results.csv,
plots and targets), or with ``--pack`` a temporary folder packed into ``OUT_DIR/details.tar.gz`` after every part.

Python is ``$PYTHON``, else ``python3``. The commit the rows record is ``$DLKERN_COMMIT``, else ``git rev-parse``
(a lent machine's copy of the tree has no ``.git``: pass DLKERN_COMMIT). The time estimates are ESTIMATES for an
H200 machine with 16 CPU cores (from CPU timings and compile counts, not measured on a GPU); each part is started
only while its step has time left, and stopped at the step's limit.
"""

import argparse
import csv
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = os.environ.get("PYTHON") or "python3"
BUDGET_S = 540  # one command's default: under the 600 s command limit, with room to pack and return the files
MIN_PART_S = 20  # a part is not started with less time than this left
BUILD = ('$PY -m pip install --no-build-isolation --no-deps -e . >"$DETAILS/build.log" 2>&1 '
         '|| { tail -40 "$DETAILS/build.log"; exit 1; }')
BUILT = '$PY -c "import dlkern, sys; sys.exit(not dlkern.build_info[\'with_cuda\'])"'


@dataclass
class Part:
    name: str
    est_min: float  # ESTIMATE on an H200 machine (16 cores), minutes
    command: str  # bash; $PY, $OUT and $DETAILS are set
    writes: str
    max_s: int = 300  # the part's own limit (the step's limit applies too)
    bench: bool = False  # a bench/run.py part: its rows are merged into $OUT/results.csv when it ends
    once: bool = False  # run once per invocation, by the first step that has it


@dataclass
class Step:
    number: int
    title: str
    limit_s: int
    parts: list = field(default_factory=list)

    @property
    def est_min(self):
        return sum(p.est_min for p in self.parts)


def _bench(name, est_min, args, max_s=240):
    return Part(name, est_min, f'$PY bench/run.py --device cuda {args} --out "$DETAILS/{name}"',
                f"$DETAILS/{name}/ (results.csv, targets, plots); rows merged into $OUT/results.csv and "
                f"$OUT/targets.md", max_s=max_s, bench=True)


ENV = Part("env", 0.1, '$PY bench/gpu_plan.py --env "$OUT/env.txt"',
           "$OUT/env.txt (date, commit, python, torch, triton, CUDA, GPU, nvidia-smi, dlkern.build_info)",
           max_s=60, once=True)
ENSURE_BUILT = Part("build-if-needed", 0.1, f"{BUILT} || {BUILD}",
                    "$DETAILS/build.log (only when dlkern is not built with its CUDA kernels for this torch)",
                    max_s=240)

STEPS = [
    Step(1, "build, CUDA smoke test of every op family, launch plans", 270, [
        Part("build", 1.0, BUILD, "$DETAILS/build.log (pip's output; its last 40 lines in step1.log on failure)",
             max_s=240),
        ENV,
        Part("smoke", 1.0, "$PY -m pytest -n 8 -p no:cacheprovider -m cuda --durations=10 tests/test_gpu_smoke.py",
             "step1.log: each family forward + backward against stock PyTorch on the GPU (float32, float64), "
             "and the launch plans against the real driver", max_s=240),
        Part("launch-plans", 0.2, "$PY tests/launch_plan_check.py",
             "step1.log: dlkern's launch plans against Triton's own launches under the stand-in driver", max_s=120),
    ]),
    Step(2, "benchmark: first-step time, model, conv blocks, ResNet-18 (cnn), host, activations", 450, [
        ENSURE_BUILT,
        ENV,
        Part("first-step", 0.4, '$PY bench/first_step.py --device cuda --out "$OUT/first_step.txt"',
             "$OUT/first_step.txt: import-to-first-step seconds, cold then warm Triton cache", max_s=120),
        _bench("model-b64", 1.2, "--suite model --batches 64 --compile-modes default"),
        _bench("convbn-b64", 1.2, "--suite convbn --quick --batches 64"),
        # ResNet-18 and the CIFAR-10 net (--quick), bf16 autocast, batch 256: eager, dlkern.convert, torch.compile;
        # one process that writes its rows only at its end, so it comes while a `--step 1,2` command has time.
        # The parts after it no longer fit that command's budget: the README's second command runs them.
        _bench("cnn", 3.0, "--suite cnn --quick --dtype bf16", max_s=300),
        _bench("model-b1024", 1.0, "--suite model --batches 1024 --compile-modes default"),
        _bench("host", 0.7, "--suite host"),
        _bench("activations", 1.0, "--suite activations --quick --sizes 24,26"),
        _bench("convbn-b1024", 1.2, "--suite convbn --quick --batches 1024"),
    ]),
    Step(3, "the whole test suite, in parallel: CUDA tests first, then the rest", 480, [
        ENSURE_BUILT,
        ENV,
        Part("cuda-tests", 3.0, "$PY -m pytest -n auto -p no:cacheprovider -m cuda --durations=20 tests",
             "step3.log: every CUDA-marked test", max_s=480),
        Part("other-tests", 4.0, '$PY -m pytest -n auto -p no:cacheprovider -m "not cuda" --durations=20 tests',
             "step3.log: the rest of the suite (CPU tensors: the C++ max pool, the composites, the checks)",
             max_s=480),
    ]),
]
STEP_BY_NUMBER = {s.number: s for s in STEPS}


def command(part):
    """The part's command line, exactly as it runs ($OUT and $DETAILS are left to bash)."""
    return part.command.replace("$PY", PY)


# ------------------------------------------------------------------------------------------------- dry run

def dry_run(out):
    print("bash bench/gpu_run.sh: the GPU run as steps that each fit one device command (at most 8 minutes).")
    print("Times are ESTIMATES for an H200 machine with 16 CPU cores, from CPU timings and compile counts (not")
    print("measured on a GPU). Each part starts only while its step has time left; a step stops at its limit.")
    print(f"OUT={out}  DETAILS=$OUT/details (with --pack: a temporary folder, packed into $OUT/details.tar.gz "
          "after every part)")
    print("every step writes $OUT/stepN.log as it runs (all it prints)")
    for step in STEPS:
        print(f"\nstep {step.number}: {step.title} (~{step.est_min:.1f} min; stops at {step.limit_s} s)")
        for part in step.parts:
            once = " (once per command)" if part.once else ""
            print(f"  {part.name} (~{part.est_min:.1f} min; at most {part.max_s} s){once}")
            print(f"    {command(part)}")
            print(f"    -> {part.writes}")
    print(f"\nSeveral steps in one command (--step 1,2) share its budget: {BUDGET_S} s unless --budget says otherwise.")
    return 0


# ------------------------------------------------------------------------------------------------- running

class Log:
    """Everything a step prints: to the console and, as it comes, to $OUT/stepN.log."""

    def __init__(self, path):
        self.file = open(path, "ab", buffering=0)

    def write(self, data):
        if isinstance(data, str):
            data = data.encode()
        if hasattr(sys.stdout, "buffer"):
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
        else:
            sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
        self.file.write(data)

    def line(self, text):
        self.write(text + "\n")


def run_part(cmd, env, limit_s, log):
    """Runs cmd under bash (its own process group), streaming its output into log; stops it after limit_s.
    Whatever it left running is stopped when it ends. Returns (exit status, or None when stopped; seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    fd = proc.stdout.fileno()
    stopped, exited_at = False, None
    while True:
        left = start + limit_s - time.monotonic()
        if left <= 0:
            stopped = True
            log.line(f"\n[stopping it: its time limit, {limit_s:.0f} s, is up]")
            break
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            data = os.read(fd, 65536)
            if not data:
                break
            log.write(data)
        elif proc.poll() is not None:  # it ended; something it started may still hold the pipe open
            exited_at = exited_at or time.monotonic()
            if time.monotonic() - exited_at > 3:
                break
    if not stopped:  # its output ended: let it finish (within its limit) before stopping what it left running
        try:
            proc.wait(max(0.0, start + limit_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = True
            log.line(f"\n[stopping it: its time limit, {limit_s:.0f} s, is up]")
    _kill(proc)
    proc.stdout.close()
    status = proc.wait()
    return (None if stopped else status), time.monotonic() - start


def _kill(proc):
    """Stops the part's process group: TERM, then KILL whatever is left 10 s later (nothing when it ended)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            proc.poll()  # reap the leader, or the group never empties
            time.sleep(0.1)


def resolve_commit():
    """$DLKERN_COMMIT, else the checkout's short hash (+dirty with uncommitted changes), else ''."""
    commit = os.environ.get("DLKERN_COMMIT", "")
    if commit:
        return commit
    try:
        git = ["git", "-C", ROOT]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        if commit and subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                     text=True).stdout.strip():
            commit += "+dirty"
    except OSError:
        commit = ""
    return commit


def pack(details, out):
    tmp = os.path.join(out, ".details.tar.gz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in sorted(os.listdir(details)):
            tar.add(os.path.join(details, name), arcname=name)
    os.replace(tmp, os.path.join(out, "details.tar.gz"))


def run_steps(numbers, out, packed, only, budget_s):
    started = time.monotonic()
    deadline = started + budget_s
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    if packed:
        details = tempfile.mkdtemp(prefix="dlkern-details-")
    else:
        details = os.path.join(out, "details")
        os.makedirs(details, exist_ok=True)
    env = dict(os.environ, OUT=out, DETAILS=details, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    commit = resolve_commit()
    if commit:
        env["DLKERN_COMMIT"] = commit  # every row and env.txt say the same
    done_once, status, built_here = set(), 0, False
    unknown = set(only or ()) - {p.name for s in STEPS for p in s.parts}
    if unknown:
        raise SystemExit(f"gpu_run.sh: unknown --only part(s) {sorted(unknown)}")
    for number in numbers:
        step = STEP_BY_NUMBER[number]
        log = Log(os.path.join(out, f"step{number}.log"))
        step_start = time.monotonic()
        step_end = min(step_start + step.limit_s, deadline)
        log.line(f"=== step {number}: {step.title} (~{step.est_min:.1f} min estimated; stops at "
                 f"{step_end - step_start:.0f} s) -- {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
        log.line(f"PY={PY} OUT={out} DETAILS={details}" + ("" if commit else
                 "\nnote: no git checkout here and DLKERN_COMMIT unset: rows will say commit 'unknown'"))
        built = True
        for part in step.parts:
            if part.once and part.name in done_once:
                continue
            if part.name == "build-if-needed" and built_here:
                continue  # this command built it already
            if only and part.name not in only and part.name not in ("build", "build-if-needed", "env"):
                continue
            if part.name not in ("build", "build-if-needed") and not built:
                log.line(f"--- {part.name}: skipped (the build failed)")
                continue
            left = step_end - time.monotonic()
            if left < MIN_PART_S:
                log.line(f"--- {part.name}: skipped (no time left in step {number}: {max(left, 0):.0f} s)")
                status = 1
                continue
            limit = min(left, part.max_s)
            cmd = command(part)
            log.line(f"\n--- {part.name} (~{part.est_min:.1f} min estimated, at most {limit:.0f} s) at "
                     f"{time.monotonic() - started:.0f} s\n$ {cmd}")
            code, took = run_part(cmd, env, limit, log)
            done_once.add(part.name)
            verdict = "stopped at its time limit" if code is None else ("ok" if code == 0 else f"exit status {code}")
            log.line(f"--- {part.name}: {verdict}, {took:.0f} s")
            if part.name in ("build", "build-if-needed"):
                built = built_here = code == 0
            if code != 0:
                status = 1
            if part.bench:
                try:
                    log.line(merge(details, out))
                except Exception as e:  # never the runner's end: the parts' own results.csv are in DETAILS
                    log.line(f"merging the results failed: {type(e).__name__}: {e}")
            if packed:
                pack(details, out)
        now = time.monotonic()
        log.line(f"=== step {number} done at {now - started:.0f} s (the step: {now - step_start:.0f} s), "
                 f"status {status}")
    if packed:
        pack(details, out)
        shutil.rmtree(details, ignore_errors=True)
    print(f"\n{out}: " + ", ".join(sorted(os.listdir(out))) + f" -- status {status}")
    return status


# ---------------------------------------------------------------------------------------------- merge, env

def _typed(value):
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


PART_ORDER = [p.name for s in STEPS for p in s.parts]


def merge(details, out):
    """Every benchmark part's results.csv under details -> out/results.csv (all columns, a first one naming the
    part), and the targets over all of those rows -> out/targets.md. Returns a one-line summary. Runs in the
    runner's process (importing torch once, not once per part)."""
    parts = sorted((d for d in os.listdir(details) if os.path.isfile(os.path.join(details, d, "results.csv"))),
                   key=lambda d: (PART_ORDER.index(d) if d in PART_ORDER else len(PART_ORDER), d))
    if not parts:
        return f"no benchmark rows under {details} yet: {out}/results.csv not written"
    rows, fields = [], []
    for part in parts:
        with open(os.path.join(details, part, "results.csv"), newline="") as f:
            reader = csv.DictReader(f)
            fields += [k for k in ["part"] + reader.fieldnames if k not in fields]
            rows += [dict(r, part=part) for r in reader]
    tmp = os.path.join(out, ".results.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(out, "results.csv"))
    summary = f"merged {len(rows)} rows of {len(parts)} parts ({', '.join(parts)}) into {out}/results.csv"
    try:
        sys.path.insert(0, HERE)
        import contextlib
        import io

        import targets

        typed = [{k: _typed(v) for k, v in r.items() if v not in ("", None)} for r in rows]
        on_cuda = any(not str(r.get("device", "CPU")).startswith("CPU") for r in typed)
        device = next((r["device"] for r in typed if "device" in r), "unknown")
        results = targets.evaluate(typed, on_cuda)
        with tempfile.TemporaryDirectory() as tmpdir, contextlib.redirect_stdout(io.StringIO()):
            targets.report(results, f"{device} (parts: {', '.join(parts)})", on_cuda, [], [], tmpdir)
            shutil.copy(os.path.join(tmpdir, "targets.md"), os.path.join(out, "targets.md"))
        met = sum(r["met"] is True for r in results)
        missed = sum(r["met"] is False for r in results)
        summary += f"; targets over them: {met} met, {missed} missed, {len(results) - met - missed} not measured"
    except Exception as e:  # the rows are merged; the targets are a convenience
        summary += f"; targets not evaluated ({type(e).__name__}: {e})"
    return summary


def write_env(path):
    """Versions, GPU, commit and build, to path and to stdout."""
    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
             f"commit: {resolve_commit() or 'unknown (no git checkout here; set DLKERN_COMMIT)'}",
             f"python: {sys.version.split()[0]} ({sys.executable})", f"cpus: {os.cpu_count()}"]
    try:
        import torch

        lines.append(f"torch: {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            lines.append(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                         f"{p.total_memory / 2**30:.1f} GiB")
        else:
            lines.append("gpu: none visible to torch")
    except Exception as e:
        lines.append(f"torch: not importable ({type(e).__name__}: {e})")
    for module in ("triton", "numpy", "xdist"):
        try:
            lines.append(f"{module}: {__import__(module).__version__}")
        except Exception as e:
            lines.append(f"{module}: not importable ({type(e).__name__})")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        lines.append(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"nvidia-smi: unavailable ({type(e).__name__})")
    try:
        import dlkern

        lines.append(f"dlkern.build_info: {json.dumps(dlkern.build_info)}")
    except Exception as e:
        lines.append(f"dlkern: not importable ({type(e).__name__}: {e})")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    with open(path, "w") as f:
        f.write(text)
    return 0


# ------------------------------------------------------------------------------------------------- collect

def collect(files, dest):
    """A packed run's returned files (OUT_DIR's) -> dest (default bench/results/<date>-<gpu>), details unpacked."""
    if not os.path.isdir(files):
        raise SystemExit(f"gpu_run.sh --collect: no folder {files}")
    if dest is None:
        date, gpu = time.strftime("%Y%m%d-%H%M", time.gmtime()), "gpu"
        env_path = os.path.join(files, "env.txt")
        if os.path.isfile(env_path):
            text = open(env_path).read()
            m = re.search(r"^date: (\d+)-(\d+)-(\d+) (\d+):(\d+)", text, re.M)
            if m:
                date = "{}{}{}-{}{}".format(*m.groups())
            m = re.search(r"^gpu: ([^,\n]+)", text, re.M)
            if m and "none" not in m.group(1):
                gpu = re.sub(r"[^A-Za-z0-9]+", "-", m.group(1)).strip("-")
        dest = os.path.join(ROOT, "bench", "results", f"{date}-{gpu}")
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(files)):
        src = os.path.join(files, name)
        if name == "details.tar.gz":
            with tarfile.open(src) as tar:
                target = os.path.join(dest, "details")
                os.makedirs(target, exist_ok=True)
                members = [m for m in tar.getmembers() if not (m.name.startswith("/") or ".." in m.name.split("/"))]
                tar.extractall(target, members=members)
        elif os.path.isfile(src):
            shutil.copy(src, os.path.join(dest, name))
    print(f"collected {files} into {dest}:")
    for base, _, names in sorted(os.walk(dest)):
        for name in sorted(names):
            print(f"  {os.path.relpath(os.path.join(base, name), dest)}")
    return 0


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(prog="bash bench/gpu_run.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--step", help="the steps to run, in order: 1, 2, 3 or a list (1,2)")
    mode.add_argument("--dry-run", action="store_true", help="print every step's commands and files; run nothing")
    mode.add_argument("--collect", metavar="FILES_DIR", help="copy a packed run's files into DEST (default "
                                                             "bench/results/<date>-<gpu>), unpacking the details")
    mode.add_argument("--merge", nargs=2, metavar=("DETAILS", "OUT"), help=argparse.SUPPRESS)
    mode.add_argument("--env", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("dir", nargs="?", help="OUT_DIR (--step, --dry-run) or DEST (--collect)")
    p.add_argument("--pack", action="store_true", help="details into OUT_DIR/details.tar.gz (a lent GPU returns "
                                                       "at most 8 files)")
    p.add_argument("--only", help="run only these parts (comma-separated; the build and env parts still run)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds for the whole command (default {BUDGET_S})")
    args = p.parse_args(argv)
    if args.dry_run:
        return dry_run(args.dir or "$OUT")
    if args.collect:
        return collect(args.collect, args.dir)
    if args.merge:
        print(merge(*args.merge))
        return 0
    if args.env:
        return write_env(args.env)
    try:
        numbers = [int(n) for n in args.step.split(",") if n.strip()]
    except ValueError:
        numbers = []
    if not numbers or any(n not in STEP_BY_NUMBER for n in numbers):
        p.error(f"--step takes step numbers from {sorted(STEP_BY_NUMBER)}, e.g. --step 1,2")
    if not args.dir:
        p.error("--step needs OUT_DIR (on a lent GPU: \"$OUT\")")
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    return run_steps(numbers, args.dir, args.pack, only, args.budget)


if __name__ == "__main__":
    sys.exit(main())
