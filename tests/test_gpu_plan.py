"""bench/gpu_run.sh's GPU plan (bench/gpu_plan.py): the dry run, the README's copy of it, the plan's sizes, and
the runner's behaviour -- time limits, logs written as it goes, merged results, packing, collecting -- on a fake
plan of shell one-liners (no GPU, no build)."""

import os
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_plan  # noqa: E402


def dry_run(**env):
    environ = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    environ.update(env)
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_run.sh"), "--dry-run"], env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def command_lines(text):
    """The dry run's command lines (four spaces in, not a '->' line)."""
    return [line[4:] for line in text.splitlines() if line.startswith("    ") and not line.startswith("    ->")]


def test_dry_run_prints_every_step_and_its_commands():
    out = dry_run()
    for step in gpu_plan.STEPS:
        assert f"step {step.number}: {step.title}" in out
        for part in step.parts:
            assert f"  {part.name} (~" in out
    commands = command_lines(out)
    assert len(commands) == sum(len(s.parts) for s in gpu_plan.STEPS)
    assert all(c.startswith("python3 ") for c in commands), commands
    assert all("-> " in line for line in out.splitlines() if line.startswith("    ->"))


def test_dry_run_honours_python():
    python = sys.executable
    commands = command_lines(dry_run(PYTHON=python))
    assert commands and all(c.startswith(python + " ") for c in commands)
    assert not any(" python3 " in f" {c} " for c in commands)


def test_readme_holds_the_dry_run_and_the_device_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    out = dry_run()
    assert out in readme, "README's 'On a lent GPU' block is not bench/gpu_run.sh --dry-run's output: paste it again"
    for line in ['bash bench/gpu_run.sh --step 1,2 --pack "$OUT"', 'bash bench/gpu_run.sh --step 1 --pack "$OUT"',
                 'bash bench/gpu_run.sh --step 2 --pack "$OUT"', 'bash bench/gpu_run.sh --step 3 --pack "$OUT"',
                 "bash bench/gpu_run.sh --collect FILES_AT"]:
        assert line in readme, line


def test_the_readmes_device_commands_parse():
    readme = open(os.path.join(ROOT, "README.md")).read()
    lines = [line.split("#")[0].strip() for line in readme.splitlines() if "bash bench/gpu_run.sh --step" in line]
    assert len(lines) >= 5
    parser_calls = []
    for line in lines:
        words = shlex.split(line.split("bash bench/gpu_run.sh", 1)[1].replace('"$OUT"', "OUTDIR").strip("`"))
        parser_calls.append(words)
        steps = [int(n) for n in words[words.index("--step") + 1].split(",")]
        assert set(steps) <= set(gpu_plan.STEP_BY_NUMBER)
        if "--only" in words:
            names = words[words.index("--only") + 1].split(",")
            assert set(names) <= {p.name for s in gpu_plan.STEPS for p in s.parts}
    assert any(words[:2] == ["--step", "1,2"] for words in parser_calls)


def test_steps_fit_one_device_command():
    """Each step stops within 8 minutes; every part's own limit within its step's. Steps 1 and 2 in one 10-minute
    command (its budget, with the machine's start ~10 minutes of device time) reach through the cnn part; the parts
    after it are the README's second command (--only), about the ~4 minutes a session has left (the last part is
    the first to go)."""
    for step in gpu_plan.STEPS:
        assert step.limit_s <= 8 * 60
        assert all(p.max_s <= step.limit_s for p in step.parts)
    assert gpu_plan.BUDGET_S <= 570
    parts = gpu_plan.STEP_BY_NUMBER[2].parts
    names = [p.name for p in parts]
    through_cnn = sum(p.est_min for p in parts[:names.index("cnn") + 1])
    assert gpu_plan.STEP_BY_NUMBER[1].est_min + through_cnn <= gpu_plan.BUDGET_S / 60
    rest = sum(p.est_min for p in parts[names.index("cnn") + 1:]) + sum(
        p.est_min for p in parts if p.name in ("build-if-needed", "env"))
    assert rest <= 4.5
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"--only {','.join(names[names.index('cnn') + 1:])} " in readme  # the second command names them all


def test_step_2_measures_what_issue_19_asks():
    import run  # bench/run.py: every option the plan passes exists

    parts = {p.name: p for p in gpu_plan.STEP_BY_NUMBER[2].parts}
    args = {}
    for name, part in parts.items():
        if part.bench:
            words = shlex.split(gpu_plan.command(part).replace('"$DETAILS/', '"DETAILS/'))
            args[name] = run.build_parser().parse_args(words[2:])
    assert args["model-b64"].batches == [64] and args["model-b1024"].batches == [1024]
    assert all(args[n].suite == ["model"] and args[n].compile_modes == ["default"] and not args[n].quick
               for n in ("model-b64", "model-b1024"))  # eager, dlkern, dlkern+graph, compile at both batches
    assert args["convbn-b64"].suite == ["convbn"] and args["convbn-b1024"].batches == [1024]
    assert args["host"].suite == ["host"]
    assert args["activations"].suite == ["activations"] and args["activations"].sizes == [24, 26]
    order = list(parts)
    assert order.index("first-step") < order.index("model-b64"), "the cold-cache time comes first"
    # ResNet-18's training step against eager and torch.compile (targets.py's cnn targets), after the parts with
    # the most H200 targets
    cnn = args["cnn"]
    assert cnn.suite == ["cnn"] and cnn.quick and cnn.dtype == ["bf16"] and cnn.compile_modes is None
    assert max(order.index("model-b64"), order.index("convbn-b64")) < order.index("cnn")
    assert "first_step.py" in gpu_plan.command(parts["first-step"])
    smoke = gpu_plan.command(gpu_plan.STEP_BY_NUMBER[1].parts[2])
    assert "-n 8" in smoke and "-m cuda" in smoke and "tests/test_gpu_smoke.py" in smoke


# ------------------------------------------------------------------------------------------- the runner

def fake_plan(monkeypatch, steps):
    monkeypatch.setattr(gpu_plan, "STEPS", steps)
    monkeypatch.setattr(gpu_plan, "STEP_BY_NUMBER", {s.number: s for s in steps})
    monkeypatch.setattr(gpu_plan, "PART_ORDER", [p.name for s in steps for p in s.parts])
    monkeypatch.setattr(gpu_plan, "PY", sys.executable)


CSV = ("device,suite,case,impl,pass,batch,ms\\nNVIDIA H200,model,MnistCNN,eager,train-step,64,1.5\\n"
       "NVIDIA H200,model,MnistCNN,dlkern,train-step,64,0.5\\n")


def test_runner_limits_logs_merges_and_packs(monkeypatch, tmp_path):
    P, S = gpu_plan.Part, gpu_plan.Step
    fake_plan(monkeypatch, [
        S(1, "one", 60, [
            P("build", 0.1, "echo building", "-"),
            P("bench-a", 0.1, f'mkdir -p "$DETAILS/bench-a" && printf "{CSV}" > "$DETAILS/bench-a/results.csv" '
                              '&& echo "$PY" > "$DETAILS/bench-a/py.txt"', "-", bench=True),
            P("slow", 0.1, "echo started; sleep 60; echo never", "-", max_s=2),
            P("after", 0.1, 'echo "after the slow one" > "$OUT/after.txt"', "-"),
        ]),
        S(2, "two", 5, [P("no-time", 0.1, "echo no", "-")]),  # 5 s < MIN_PART_S: skipped
    ])
    out = tmp_path / "out"
    start = time.monotonic()
    status = gpu_plan.run_steps([1, 2], str(out), packed=True, only=None, budget_s=120)
    assert time.monotonic() - start < 30
    assert status == 1  # stopped and skipped parts
    log1 = (out / "step1.log").read_text()
    assert "\nbuilding\n" in log1 and "\nstarted\n" in log1 and "\nnever\n" not in log1
    assert "[stopping it: its time limit, 2 s, is up]" in log1 and "--- slow: stopped at its time limit" in log1
    assert (out / "after.txt").read_text() == "after the slow one\n"
    assert "--- no-time: skipped (no time left in step 2" in (out / "step2.log").read_text()
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("part,device,suite") and len(rows) == 3 and rows[1].startswith("bench-a,")
    assert "model step vs eager" in (out / "targets.md").read_text()
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
        assert "bench-a/results.csv" in names
        assert tar.extractfile("bench-a/py.txt").read().decode().strip() == sys.executable
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and not any(f.startswith(".") for f in files), files
    # collect: the files of the run, details unpacked, named after env.txt's date and GPU when no DEST is given
    (out / "env.txt").write_text("date: 2026-12-07 10:11:12 UTC\ngpu: NVIDIA H200, sm_90, 132 SMs, 139.8 GiB\n")
    monkeypatch.setattr(gpu_plan, "ROOT", str(tmp_path))
    assert gpu_plan.collect(str(out), None) == 0
    dest = tmp_path / "bench" / "results" / "20261207-1011-NVIDIA-H200"
    assert (dest / "step1.log").is_file() and (dest / "details" / "bench-a" / "results.csv").is_file()
    assert not (dest / "details.tar.gz").exists()


def test_runner_skips_what_needs_a_failed_build(monkeypatch, tmp_path):
    P, S = gpu_plan.Part, gpu_plan.Step
    fake_plan(monkeypatch, [S(1, "one", 60, [P("build", 0.1, "echo broken; exit 3", "-"),
                                             P("smoke", 0.1, 'touch "$OUT/ran"', "-")])])
    out = tmp_path / "out"
    assert gpu_plan.run_steps([1], str(out), packed=False, only=None, budget_s=60) == 1
    log = (out / "step1.log").read_text()
    assert "--- build: exit status 3" in log and "--- smoke: skipped (the build failed)" in log
    assert not (out / "ran").exists() and (out / "details").is_dir()


def test_only_runs_the_named_parts(monkeypatch, tmp_path):
    P, S = gpu_plan.Part, gpu_plan.Step
    fake_plan(monkeypatch, [S(2, "two", 60, [P("build-if-needed", 0.1, 'touch "$OUT/built"', "-"),
                                             P("a", 0.1, 'touch "$OUT/a"', "-"), P("b", 0.1, 'touch "$OUT/b"', "-")])])
    out = tmp_path / "out"
    assert gpu_plan.run_steps([2], str(out), packed=False, only=["b"], budget_s=60) == 0
    assert (out / "built").exists() and (out / "b").exists() and not (out / "a").exists()
    with pytest.raises(SystemExit):
        gpu_plan.run_steps([2], str(out), packed=False, only=["nope"], budget_s=60)


def test_first_step_script_on_cpu(tmp_path):
    """bench/first_step.py prints and writes its line (on a CPU the composites run: nothing compiles)."""
    out = tmp_path / "first_step.txt"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "first_step.py"), "--device", "cpu",
                             "--batch", "2", "--runs", "cold", "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("import-to-first-step: ")
    line = out.read_text().strip()
    assert line.startswith("import-to-first-step: ") and "cold Triton cache" in line and "nothing compiles" in line
