"""bench/run.py end to end: the quick benchmark on the CPU, in a subprocess, as a smoke test (not a timing test).

It runs with --device cpu even on a GPU machine (the GPU benchmark is bench/gpu_run.sh's job, and takes
minutes), on one thread, and without TRITON_INTERPRET: the benchmark must run on a plain CPU install, where dlkern's Triton ops
fall back to PyTorch composites."""

import csv
import os
import subprocess
import sys

import pytest

from dlkern.catalog import CATALOG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_COLUMNS = {"device", "torch", "triton", "cuda", "commit", "timestamp"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it without a GPU
    proc = subprocess.run(
        # one thread: on a shared machine, threads waiting for a busy core stall every parallel region
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--device", "cpu", "--threads", "1",
         "--out", str(out), "--data-dir", str(out / "no-mnist-here")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,  # the kernels suite compiles for sm_90
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, proc.stdout, rows


def test_csv_has_env_columns_on_every_row(quick_run):
    _, _, rows = quick_run
    assert rows
    assert ENV_COLUMNS <= set(rows[0])
    for r in rows:
        assert all(r[c] for c in ENV_COLUMNS), r
        assert r["device"].startswith("CPU")


def test_maxpool_and_model_rows(quick_run):
    _, _, rows = quick_run
    maxpool = [r for r in rows if r["suite"] == "maxpool"]
    assert {(r["impl"], r["layout"], r["pass"]) for r in maxpool} == {
        (impl, layout, pass_) for impl in ("dlkern", "eager") for layout in ("nchw", "channels_last")
        for pass_ in ("fwd", "bwd")}
    model = [r for r in rows if r["suite"] == "model"]
    assert {(r["impl"], r["pass"]) for r in model} == {
        (impl, pass_) for impl in ("eager", "dlkern") for pass_ in ("train-step", "inference")}
    for r in maxpool + model:
        assert float(r["ms"]) > 0 and float(r["speedup"]) > 0
    assert all(float(r["images_per_s"]) > 0 for r in model)
    # the dlkern rows on a CPU time the PyTorch-composite fallback, and say so
    assert all("composite" in r["note"] for r in model if r["impl"] == "dlkern")
    accuracy = [r for r in rows if r["suite"] == "accuracy"]
    assert [(r["case"], r["impl"]) for r in accuracy] == [("synthetic to 75%", "eager")]


def test_gpu_only_parts_say_they_were_skipped(quick_run):
    out, stdout, _ = quick_run
    for message in ["activations: skipped the whole suite", "convbn: skipped the whole suite",
                    "cnn: skipped the whole suite: CUDA only",
                    "model: skipped dlkern+graph and torch.compile variants", "accuracy: skipped the dlkern backend",
                    "accuracy: skipped MNIST"]:
        assert message in stdout
    assert "composite" in stdout  # the model table's note on the dlkern backend
    targets = (out / "targets.md").read_text()
    assert "not evaluated: a CPU run" in targets and "activations: the whole suite" in targets


def test_plots_and_targets_written(quick_run):
    out, stdout, _ = quick_run
    for name in ("maxpool_speedup.png", "model_speedup.png", "targets.md", "targets.csv"):
        assert (out / name).stat().st_size > 0
    assert not (out / "activations_bandwidth.png").exists()
    assert "activations_bandwidth.png: not drawn" in stdout
    with open(out / "targets.csv", newline="") as f:
        targets = list(csv.DictReader(f))
    gpu = [t for t in targets if not t["target"].startswith(("host: ", "cpu: ", "kernels: "))]
    assert len(gpu) == 13 and {t["met"] for t in gpu} == {"not measured"}
    cpu = [t for t in targets if t["target"].startswith("cpu: ")]
    assert len(cpu) == 2 and all(t["met"] in ("yes", "no") for t in cpu), cpu
    assert "H200 targets, 13, not evaluated without a GPU" in stdout
    host = [t for t in targets if t["target"].startswith("host: ")]
    assert len(host) == 8 and all(t["met"] in ("yes", "no") for t in host), host  # measured on a CPU too
    kernels = {t["target"]: t["met"] for t in targets if t["target"].startswith("kernels: ")}
    assert kernels.pop("kernels: cold start") == "not measured"  # not with --quick
    assert len(kernels) == 6 and set(kernels.values()) <= {"yes", "no"}, kernels  # compiled on the CPU, the models


def test_host_rows(quick_run):
    """The host suite ran dlkern's GPU launch path (stand-in driver) side by side with eager, with launch counts."""
    _, stdout, rows = quick_run
    host = [r for r in rows if r["suite"] == "host"]
    cases = {(r["case"], r["pass"]) for r in host}
    assert ("MnistCNN", "train-step") in cases and ("MnistCNN", "inference") in cases
    assert ("max_pool2d 2x2", "fwd+bwd") in cases and ("relu", "fwd+bwd") in cases
    for case in cases:
        assert {r["impl"] for r in host if (r["case"], r["pass"]) == case} == {"dlkern", "eager"}
    assert all(float(r["ms"]) > 0 and int(r["launches"]) > 0 for r in host)
    step = next(r for r in host if r["impl"] == "dlkern" and r["pass"] == "train-step")
    # The stand-in driver lets the Triton path run on CPU tensors: the fused blocks' kernels are among the launches.
    assert int(step["launches"]) > 20
    assert "stand-in Triton driver" in stdout


def test_host_resnet_rows(quick_run):
    """The host suite's ResNet-18 training step: the stand-in replica (batch 2), dlkern.convert-ed against stock,
    host time and launches side by side; its 20 fused sites launch at least their 20 forward GEMMs."""
    _, stdout, rows = quick_run
    resnet = {r["impl"]: r for r in rows if r["suite"] == "host" and r["case"] == "ResNet-18 stand-in"}
    assert set(resnet) == {"dlkern", "eager"}
    for r in resnet.values():
        assert r["pass"] == "train-step" and r["batch"] == "2" and float(r["ms"]) > 0 and int(r["launches"]) > 20
    assert float(resnet["dlkern"]["host_ratio"]) == pytest.approx(float(resnet["dlkern"]["ms"]) /
                                                                  float(resnet["eager"]["ms"]), rel=1e-4)
    assert "ResNet-18 stand-in: torchvision's ResNet-18 code" in stdout


def test_coverage_rows(quick_run):
    """The coverage suite converted each model of its quick list and counted the report's sites."""
    _, stdout, rows = quick_run
    coverage = {r["case"]: r for r in rows if r["suite"] == "coverage"}
    assert list(coverage) == ["resnet18", "resnet50", "vgg11_bn", "googlenet", "densenet121", "mobilenet_v2",
                              "cifar-net"]
    for r in coverage.values():
        sites, fused, unfused = int(r["sites"]), int(r["fused"]), int(r["unfused"])
        assert sites == fused + unfused and sites > 0, r
        assert bool(r["why_unfused"]) == (unfused > 0), r
    # conv -> BN sites as the stock models hold them: ResNet-18's 20; the CIFAR net's 3 + 3 with a pool between
    assert coverage["resnet18"]["sites"] == "20" and coverage["cifar-net"]["sites"] == "6"
    assert coverage["resnet18"]["tested"].startswith(f"{coverage['resnet18']['fused']}/20")  # the tests' table
    assert "coverage: conv -> BatchNorm sites dlkern.convert fuses" in stdout


# ------------------------------------------------------------------ targets and plots over GPU-shaped rows
# The GPU suites cannot run without a GPU, but what turns their rows into ✓/✗ and plots can be checked here.


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_rows():
    rows = [dict(suite="roof", case="copy", impl="copy", gbps=4000.0, pct_roof=100.0)]

    def add(suite, impl, ms, **kw):
        rows.append(dict(suite=suite, impl=impl, ms=ms, device="NVIDIA H200", **kw))

    for dtype, pct in (("float32", 95.0), ("bfloat16", 85.0)):  # bf16 misses the roof
        for pass_ in ("fwd", "fwd+bwd"):
            for numel, size in ((2**20, "2^20"), (2**26, "2^26")):
                case = dict(case="relu", dtype=dtype, numel=numel, size=size, **{"pass": pass_})
                for impl, ms in (("eager", 1.2), ("compile", 1.1), ("dlkern", 1.0)):
                    add("activations", impl, ms, gbps=40 * pct / ms, pct_roof=pct / ms, speedup=1.2 / ms, **case)
    for layout in ("nchw", "channels_last"):
        for pass_, eager_ms in (("fwd", 1.1), ("bwd", 1.3)):
            case = dict(case="max_pool2d 2x2", dtype="float32", layout=layout, size="64x32x28x28", batch=64)
            add("maxpool", "eager", eager_ms, speedup=1.0, **case, **{"pass": pass_})
            add("maxpool", "dlkern", 1.0, speedup=eager_ms, **case, **{"pass": pass_})
    for pass_, times in (("train", dict(eager=2.0, compile=1.5, dlkern=1.0)), ("eval", dict(eager=1.4, dlkern=1.0))):
        for impl, ms in times.items():
            add("convbn", impl, ms, case="block1", batch=64, speedup=times["eager"] / ms, **{"pass": pass_})
    step = {"eager": 10.0, "dlkern": 4.0, "compile": 5.0, "dlkern+graph": 1.5, "compile-reduce-overhead": 2.0}
    for impl, ms in step.items():
        add("model", impl, ms, case="MnistCNN", batch=64, speedup=10.0 / ms, **{"pass": "train-step"})
        add("model", impl, ms * 100, case="MnistCNN", batch=8192, speedup=10.0 / ms, **{"pass": "train-step"})
    return rows


def test_targets_over_gpu_rows(tmp_path):
    targets = _load("targets")
    results = {r["target"]: r for r in targets.evaluate(_gpu_rows(), on_cuda=True)}
    # no CPU targets on a GPU run
    assert len(results) == len(targets.TARGETS) + len(targets.HOST_TARGETS) + len(targets.KERNEL_TARGETS) == 28
    results = {name: r for name, r in results.items() if not name.startswith(("host: ", "kernels: "))}
    expected = {
        "activations roof": False, "activations vs PyTorch": True, "max pool fwd": True, "max pool bwd": True,
        "conv blocks train": True, "conv blocks eval": False, "model step vs eager": True,
        "model step vs compile": True, "graph step vs eager": True, "graph step vs reduce-overhead": True,
        "model inference": None, "cnn: ResNet-18 vs eager": None, "cnn: ResNet-18 vs compile": None,
    }
    assert {name: r["met"] for name, r in results.items()} == expected
    assert "85%" in results["activations roof"]["detail"] and "bfloat16" in results["activations roof"]["detail"]
    assert "1.40x eager" in results["conv blocks eval"]["detail"]
    assert "not measured" in results["model inference"]["detail"]
    targets.report(list(results.values()), "NVIDIA H200", True, [("convbn", "x", "why")], [], str(tmp_path))
    text = (tmp_path / "targets.md").read_text()
    assert "| ✓ | max pool bwd |" in text and "| ✗ | activations roof |" in text and "- convbn: x: why" in text


def test_cnn_targets_over_rows():
    """The cnn suite's ResNet-18 targets take the worst case over the dtypes (and batches) run."""
    targets = _load("targets")
    rows = []
    for dtype, times in (("float32", dict(eager=10.0, compile=7.0, dlkern=7.5)),
                         ("bfloat16", dict(eager=6.0, compile=5.0, dlkern=4.8))):
        for impl, ms in times.items():
            for case in ("resnet18", "cifar-net"):  # the CIFAR net's rows do not count for ResNet-18's targets
                rows.append(dict(suite="cnn", case=case, impl=impl, dtype=dtype, layout="channels_last", batch=256,
                                 ms=ms if case == "resnet18" else 1.0, **{"pass": "train-step"}))
    results = {r["target"]: r for r in targets.evaluate(rows, on_cuda=True)}
    vs_eager, vs_compile = results["cnn: ResNet-18 vs eager"], results["cnn: ResNet-18 vs compile"]
    assert vs_eager["met"] is False and vs_eager["detail"] == (
        "worst resnet18 train-step bfloat16 channels_last 256: 1.25x eager")
    assert vs_compile["met"] is False and "float32" in vs_compile["detail"] and "0.93x compile" in vs_compile["detail"]
    assert {r["target"]: r["met"] for r in targets.evaluate(rows, on_cuda=False)}["cnn: ResNet-18 vs eager"] is None


def test_plots_over_gpu_rows(tmp_path):
    made = _load("plots").make_plots(_gpu_rows(), str(tmp_path))
    assert made == [str(tmp_path / f"{name}.png") for name in
                    ("activations_bandwidth", "maxpool_speedup", "convbn_speedup", "model_speedup")]
    assert all(os.path.getsize(path) > 10_000 for path in made)


def test_host_targets_over_rows():
    targets = _load("targets")
    rows = []
    for impl, step_ms, relu_ms, launches, fills in (("eager", 1.0, 0.010, 50, 1), ("dlkern", 2.0, 0.025, 30, 0)):
        rows.append(dict(suite="host", impl=impl, case="MnistCNN", batch=64, ms=step_ms, launches=launches,
                         fills=fills, **{"pass": "train-step"}))
        rows.append(dict(suite="host", impl=impl, case="relu", ms=relu_ms, **{"pass": "fwd+bwd"}))
    results = {r["target"]: r for r in targets.evaluate(rows, on_cuda=False)}
    assert results["host: train step"]["met"] is False and "0.50x eager" in results["host: train step"]["detail"]
    assert results["host: activations"]["met"] is True  # 2.5x ATen's host time: within 3x
    assert results["host: launches"]["met"] is True and "30 launches, 0 fills" in results["host: launches"]["detail"]
    assert results["host: max pool"]["met"] is None
    assert results["activations roof"]["met"] is None  # GPU targets: not on a CPU run
    assert results["cpu: max pool"]["met"] is None  # no maxpool rows
    assert results["host: ResNet-18 step"]["met"] is None and results["host: ResNet-18 launches"]["met"] is None
    for impl, ms, launches in (("eager", 10.0, 166), ("dlkern", 12.5, 207)):
        rows.append(dict(suite="host", impl=impl, case="ResNet-18 stand-in", batch=2, ms=ms, launches=launches,
                         fills=1, **{"pass": "train-step"}))
    results = {r["target"]: r for r in targets.evaluate(rows, on_cuda=False)}
    step = results["host: ResNet-18 step"]
    assert step["met"] is False and "0.80x eager" in step["detail"]
    assert results["host: ResNet-18 launches"] == dict(results["host: ResNet-18 launches"], met=False,
                                                       detail="207 launches per step, eager 166")
    assert "30 launches, 0 fills" in results["host: launches"]["detail"]  # still the MnistCNN's row


def test_kernels_rows(quick_run):
    """The kernels suite compiled a sample of the MnistCNN's Triton kernels for sm_90 and read their resources."""
    _, stdout, rows = quick_run
    kernels = [r for r in rows if r["suite"] == "kernels" and not r["case"].startswith("byte model")]
    assert {"conv_fwd_kernel", "bn_act_pool_fwd_kernel"} <= {r["case"] for r in kernels}
    for r in kernels:
        assert r["config"] and set(r["dtype"].split("/")) <= {"fp32", "bf16", "fp16"}, r
        assert int(r["regs"]) > 0 and int(r["warps"]) >= 1 and 0 <= float(r["occupancy"]) <= 100, r
        assert int(r["spill_stores"]) >= 0 and float(r["shared_kb"]) >= 0 and r["mma"], r
    assert any(r["mma"].startswith("wgmma") for r in kernels if r["case"] == "conv_fwd_kernel")
    assert "kernels: skipped cold start: --quick" in stdout
    assert "kernels: per kernel and dtype" in stdout


def test_kernel_targets_over_rows():
    targets = _load("targets")

    def variant(case, gemm, **figures):
        row = dict(suite="kernels", case=case, impl="dlkern", config="BLOCK=64 w4 s3", dtype="fp32", variants=2,
                   regs=64, gemm=gemm, spilling=0, unlaunchable=0, low_occupancy=0, note="")
        return dict(row, **figures)

    rows = [variant("conv_fwd_kernel", True, spilling=1, low_occupancy=2, note="spills (3 stores, 3 loads, 8 B stack)"),
            variant("bn_act_fwd_kernel", False),
            dict(suite="kernels", case="cold start", impl="dlkern", variants=128, errors=0, compile_s=215.0)]
    results = {r["target"]: r for r in targets.evaluate(rows, on_cuda=False)}
    assert results["kernels: spills"]["met"] is False
    assert results["kernels: spills"]["detail"] == (
        "1 of 4 variants (e.g. conv_fwd_kernel [BLOCK=64 w4 s3] fp32: spills (3 stores, 3 loads, 8 B stack))")
    assert results["kernels: launchable"] == dict(results["kernels: launchable"], met=True, detail="0 of 4 variants")
    assert results["kernels: GEMM occupancy"]["met"] is False and "2 of 2 variants" in results[
        "kernels: GEMM occupancy"]["detail"]
    assert results["kernels: other occupancy"]["met"] is True
    assert results["kernels: cold start"]["met"] is False
    assert results["kernels: cold start"]["detail"] == "215 CPU s, 128 variants"
    rows[-1]["compile_s"] = 42.0
    assert {r["target"]: r["met"] for r in targets.evaluate(rows, on_cuda=True)}["kernels: cold start"] is True


def test_cpu_run_is_truthful(quick_run):
    """One torch thread by default on a CPU run (printed); no share of a roof above 100%; every timed row carries
    its spread and says what it timed."""
    _, stdout, rows = quick_run
    assert "on 1 torch thread(s)" in stdout and all(", 1 threads" in r["device"] for r in rows)
    assert all(not r["pct_roof"] or float(r["pct_roof"]) <= 100 for r in rows)
    timed_rows = [r for r in rows if r["suite"] in ("maxpool", "model")]
    assert all(r["spread"] != "" and r["kernel"] for r in timed_rows)
    assert {r["kernel"] for r in timed_rows if r["impl"] == "dlkern"} == {"C++ kernel", "PyTorch composite + C++ max pool"}


def test_stale_plots_removed(tmp_path):
    stale = tmp_path / "convbn_speedup.png"
    stale.write_bytes(b"an earlier run's plot")
    rows = [r for r in _gpu_rows() if r["suite"] != "convbn"]
    made = _load("plots").make_plots(rows, str(tmp_path))
    assert "convbn_speedup.png: not drawn, no convbn rows in this run" in made and not stale.exists()


# ------------------------------------------------------------------------------------------ the byte model


def _bytemodel(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))  # its report prints through bench/timing.py
    return _load("bytemodel")


def test_byte_model_block_by_hand(monkeypatch):
    """Block 2 (32x14x14 -> conv 3x3, no padding -> 32x12x12 -> pool 32x6x6) at batch 64, counted by hand from
    the kernels' loads and stores (fp32; dlkern's pool fused, its argmax one byte; eager's int64 pool indices;
    H200 splits)."""
    bm = _bytemodel(monkeypatch)
    x, w, vec = 64 * 32 * 14 * 14 * 4, 32 * 32 * 9 * 4, 32 * 4
    z, pooled, idx = 64 * 32 * 12 * 12 * 4, 64 * 32 * 6 * 6 * 4, 64 * 32 * 6 * 6 * 8
    M, Z, P = 64 * 12 * 12, 64 * 32 * 12 * 12, 64 * 32 * 6 * 6  # conv rows, conv output and pooled elements
    tiles = M // 64  # 144 row tiles of conv_fwd's statistics partials: one merge level (<= 1024)
    fwd_part = 2 * tiles * 32 * 4
    bwd_part = 2 * 72 * 32 * 8  # 72 splits of 128 rows (the minimum; 528 wanted) x (sum g_u, sum g_u*x_hat), fp64
    wgrad_part = 72 * (32 * 288 + 32) * 4  # 72 splits of 128 rows x (dW, d(bias)), fp32
    dlkern = {
        "conv_fwd_kernel": x + w + vec + z + fwd_part,
        "bn_stats_finalize_kernel": fwd_part + 2 * vec + 8 + 5 * vec,
        "bn_act_pool_fwd_kernel": z + 4 * vec + 8 + pooled + P + 8,
        "bn_act_bwd_reduce_kernel": pooled + P + z + 4 * vec + bwd_part,
        "grad_z_kernel": bwd_part + pooled + P + z + 4 * vec + z + 2 * vec,
        "conv_bwd_input_kernel": z + w + x,
        "conv_bwd_weight_kernel": z + x + wgrad_part,
        "sum_splits_kernel": wgrad_part + w + vec,
    }
    eager = {
        "cuDNN conv fwd": x + w + z, "conv bias add_": 2 * z + vec, "num_batches_tracked add_": 16,
        "BN statistics": z + 2 * vec, "BN running update + invstd": 7 * vec, "BN normalize": 2 * z + 4 * vec,
        "ReLU": 2 * z, "max_pool2d_with_indices": z + pooled + idx, "max pool bwd: zero_ grad_input": z,
        "max_pool2d_with_indices_backward": pooled + idx + z, "ReLU bwd (threshold_backward)": 3 * z,
        "BN backward (reduce + elementwise)": 4 * z + 4 * vec + z + 2 * vec, "conv bias grad (sum)": z + vec,
        "cuDNN conv dgrad": z + w + x, "cuDNN conv wgrad": z + x + w,
    }
    gemms = 2 * M * 32 * 288 * 2 + 2 * (64 * 14 * 14) * 32 * 32 * 9  # fwd and wgrad, then dgrad over dx's rows
    dlkern_flops = gemms + 10 * tiles * 32 + 4 * Z + P + 8 * Z + 10 * Z + wgrad_part // 4
    for impl, expected, flops, launches in (("dlkern", dlkern, dlkern_flops, 8),
                                            ("eager", eager, None, 15)):
        block = [k for k in bm.step_kernels(impl, 64) if k["where"] == "block 2"]
        assert {k["kernel"].name: k["reads"] + k["writes"] for k in block} == expected
        assert bm.totals(block)["bytes"] == sum(expected.values())
        assert bm.totals(block)["launches"] == launches
        if flops is not None:
            assert bm.totals(block)["flops"] == flops
    first = [k["kernel"].name for k in bm.step_kernels("dlkern", 64) if k["where"] == "block 1"]
    assert "conv_bwd_input_kernel" not in first and len(first) == 7  # the input needs no gradient
    # Block 1 at batch 8192: 8192*784/64 = 100352 row tiles, merged first in 98 groups of <= 1024.
    first = {k["kernel"].name: k for k in bm.step_kernels("dlkern", 8192) if k["where"] == "block 1"}
    fwd_part, merged = 2 * 100352 * 32 * 4, 2 * 98 * 32 * 4
    level = first["bn_stats_finalize_kernel (first level)"]
    assert (level["reads"], level["writes"]) == (fwd_part, merged)
    assert first["bn_stats_finalize_kernel"]["reads"] == merged + 2 * vec + 8


def test_byte_model_follows_dlkern(monkeypatch):
    """The model's splits are dlkern's on a 132-SM GPU, and it counts the launches tests/test_step_launches.py
    counts for a dlkern step (25 Triton, the max pool fused, 13 ATen, 7 foreach Adam), plus a first statistics merge
    level in each block with over 1024 row tiles (blocks 1 and 2 at batch 1024, all three at 8192)."""
    import torch

    from dlkern.ops import conv_tiles

    bm = _bytemodel(monkeypatch)
    monkeypatch.setattr(conv_tiles, "INTERPRETING", False)
    monkeypatch.setattr(conv_tiles, "sm_count", lambda device: 132)
    for M in (64 * 144, 8192 * 784, 8192 * 16, 1):
        for programs in (1, 5):
            assert bm.rows_per_split(M, programs) == conv_tiles.rows_per_split(M, torch.device("cuda"), programs)
    assert {b: bm.totals(bm.step_kernels("dlkern", b))["launches"] for b in bm.BATCHES} == {64: 45, 1024: 47,
                                                                                           8192: 48}


def test_byte_model_rows_and_report(monkeypatch, capsys):
    """The kernels suite returns the model's rows and prints its tables even where it compiles nothing
    (TRITON_INTERPRET, set by conftest without a GPU)."""
    bm = _bytemodel(monkeypatch)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the kernels suite's interpreter path only")
    kernels = _load("kernels")
    skipped = []
    run = type("Run", (), {"quick": True, "skip": lambda self, *why: skipped.append(why)})()
    rows = kernels.run_suite(run)
    out = capsys.readouterr().out
    resnet = [r for r in rows if r["case"] == "byte model ResNet-18"]
    rows = [r for r in rows if r["case"] == "byte model"]
    assert [(r["impl"], r["batch"]) for r in rows] == [(i, b) for b in (64, 1024, 8192) for i in ("dlkern", "eager")]
    assert all(r["suite"] == "kernels" and r["case"] == "byte model" and "a model" in r["note"] for r in rows)
    assert [(r["impl"], r["batch"]) for r in resnet] == [("dlkern", 256), ("eager", 256)]
    assert "byte model, ResNet-18 training step" in out and "ResNet-18, dlkern per kernel at batch 256" in out
    by = {(r["impl"], r["batch"]): r for r in rows}
    for batch in (64, 1024, 8192):
        d, e = by["dlkern", batch], by["eager", batch]
        assert 0 < d["model_bytes"] < e["model_bytes"] and e["launches"] == 66
        assert d["launch_roofline_ms"] == pytest.approx(d["roofline_ms"] + d["launches"] * 3e-3)
    assert by["dlkern", 8192]["roofline_ms"] == pytest.approx(
        1e3 * sum(k["seconds"] for k in bm.step_kernels("dlkern", 8192)))
    assert skipped == [("kernels", "the compiled variants",
                        "TRITON_INTERPRET is set: the kernels are not compiled for a GPU")]
    assert "byte model -- a model (compulsory DRAM bytes, H200 roofline), not a measurement" in out
    assert "dlkern per kernel at batch 8192" in out and "eager per kernel at batch 8192" in out
    assert "grad_z_kernel" in out and "BN backward (reduce + elementwise)" in out


def test_byte_model_shapes_leave_the_rng_alone(monkeypatch):
    """The stock model is built on the meta device (no random draws: the suites after the kernels suite see the
    same random numbers), and its shapes are the MnistCNN's."""
    import torch

    bm = _bytemodel(monkeypatch)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    blocks, linears, parameters = bm.model_shapes.__wrapped__(64)
    assert torch.rand(1) == expected
    assert [(b["x"], b["z"], b["pooled"]) for b in blocks] == [
        ((64, 1, 28, 28), (64, 32, 28, 28), (64, 32, 14, 14)), ((64, 32, 14, 14), (64, 32, 12, 12), (64, 32, 6, 6)),
        ((64, 32, 6, 6), (64, 32, 4, 4), (64, 32, 2, 2))]
    assert linears == [(128, 64), (64, 10)] and parameters == 27914


def test_byte_model_target_over_rows():
    targets = _load("targets")

    def model(impl, gb, batch=8192):
        return dict(suite="kernels", case="byte model", impl=impl, dtype="float32", batch=batch,
                    model_bytes=int(gb * 1e9), launches=51, note="a model")

    def byte_target(rows):
        return {r["target"]: r for r in targets.evaluate(rows, on_cuda=False)}["kernels: byte model"]

    rows = [model("dlkern", 13.4), model("eager", 23.3), model("dlkern", 0.01, batch=64), model("eager", 1.0, 64)]
    assert byte_target(rows) == dict(byte_target(rows), met=False,
                                     detail="modeled: dlkern 13.40 GB, eager 23.30 GB per step: 0.58x")
    rows[0]["model_bytes"] = int(11.65e9)  # exactly half: met
    assert byte_target(rows)["met"] is True and "0.50x" in byte_target(rows)["detail"]
    assert byte_target(rows[2:]) == dict(byte_target(rows[2:]), met=None,
                                         detail="not measured (kernels suite: byte model at batch 8192)")
    # a model, so evaluated on a GPU run as on a CPU run
    assert {r["target"]: r["met"] for r in targets.evaluate(rows, on_cuda=True)}["kernels: byte model"] is True


def _resnet_bytemodel(monkeypatch):
    _bytemodel(monkeypatch)  # bench/ on the path: bytemodel_resnet imports bytemodel
    return _load("bytemodel_resnet")


def test_resnet_byte_model_sites(monkeypatch):
    """ResNet-18's sites from torchvision's model on the meta device: the stem (input needs no gradient), 8
    BasicBlocks of conv1 (ReLU) and conv2 (+ residual, ReLU), 3 stride-2 1x1 downsamples (no activation); the
    stem's pool 64x16x16 -> 64x8x8."""
    br = _resnet_bytemodel(monkeypatch)
    sites, pool, blocks, head, parameters = br.model_shapes.__wrapped__(256)
    assert len(sites) == 20 and [s["name"] for s in sites if s["first"]] == ["stem"]
    assert sum(s["res"] for s in sites) == 8
    assert all(s["act"] and s["name"].endswith(".conv2") for s in sites if s["res"])
    downsample = [s for s in sites if not s["act"]]
    assert [s["name"] for s in downsample] == ["layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"]
    assert all(s["kernel"] == (1, 1) and s["x"][2] == 2 * s["z"][2] for s in downsample)
    assert sites[0]["z"] == (256, 64, 16, 16) and pool == ((256, 64, 16, 16), (256, 64, 8, 8))
    assert len(blocks) == 8 and head == ((256, 512, 1, 1), 512, 10) and parameters == 11181642


def test_resnet_byte_model_site_by_hand(monkeypatch):
    """layer2.0's conv2 site (128x4x4 -> conv 3x3 -> BN -> + the downsample's output -> ReLU) at batch 256,
    counted by hand from the kernels' loads and stores (fp32, H200 splits), and the step's launches."""
    br = _resnet_bytemodel(monkeypatch)
    x = z = 256 * 128 * 4 * 4 * 4  # input, conv output, residual and every gradient of their size
    w, vec = 128 * 128 * 9 * 4, 128 * 4
    fwd_part = 2 * (256 * 16 // 64) * 128 * 4  # 64 row tiles of 64 rows x (mean, M2)
    bwd_part = 2 * 32 * 128 * 8  # 32 splits of 128 rows (528 wanted for 2 channel blocks) x 2 sums, fp64
    wgrad_part = 7 * (128 * 1152 + 128) * 4  # 7 splits of 640 rows x (dW, d(bias))
    dlkern = {
        "conv_fwd_kernel": x + w + z + fwd_part,
        "bn_stats_finalize_kernel": fwd_part + 2 * vec + 8 + 5 * vec,
        "bn_act_fwd_kernel, residual": 2 * z + 4 * vec + 8 + z + 8,  # z and the residual in, the output out
        "bn_act_bwd_reduce_kernel, residual": 3 * z + 4 * vec + bwd_part,  # g, z, residual
        "grad_z_kernel, residual": bwd_part + 3 * z + 4 * vec + 2 * z + 2 * vec,  # dL/dz and dL/dresidual out
        "conv_bwd_input_kernel": z + w + x,
        "conv_bwd_weight_kernel": z + x + wgrad_part,
        "sum_splits_kernel": wgrad_part + w + vec,
    }
    eager = {
        "cuDNN conv fwd": x + w + z, "num_batches_tracked add_": 16, "BN statistics": z + 2 * vec,
        "BN running update + invstd": 7 * vec, "BN normalize": 2 * z + 4 * vec,
        "residual add_ (out += identity)": 3 * z, "ReLU (in place)": 2 * z, "ReLU bwd (threshold_backward)": 3 * z,
        "BN backward (reduce + elementwise)": 4 * z + 4 * vec + z + 2 * vec, "cuDNN conv dgrad": z + w + x,
        "cuDNN conv wgrad": z + x + w,
    }
    for impl, expected in (("dlkern", dlkern), ("eager", eager)):
        kernels = br.step_kernels(impl)
        site = [k for k in kernels if k["where"] == "layer2.0.conv2"]
        assert {k["kernel"].name: k["reads"] + k["writes"] for k in site} == expected, impl
    # Launches. dlkern: 8 a site (7 for the stem: no input gradient; 7 where the weight gradient is one split,
    # written directly: layer3's and layer4's 7 sites at 512 and 128 rows a sample), the pool and its backward,
    # 8 gradient sums, 11 head and loss kernels, 3 SGD. Eager: 5 forward kernels a site, 17 ReLUs and their
    # backward, 8 residual adds, BN backward, 19 dgrads, 20 wgrads; 3 for the pool, then the same 8 + 11 + 3.
    single = [k["where"] for k in br.step_kernels("dlkern") if k["kernel"].name == "conv_bwd_weight_kernel"
              and not any(j["where"] == k["where"] and j["kernel"].name == "sum_splits_kernel"
                          for j in br.step_kernels("dlkern"))]
    assert len(single) == 7 and all(s.startswith(("layer3", "layer4")) for s in single)
    assert br.bm.totals(br.step_kernels("dlkern"))["launches"] == 20 * 8 - 1 - 7 + 2 + 8 + 11 + 3 == 176
    assert br.bm.totals(br.step_kernels("eager"))["launches"] == 5 * 20 + 2 * 17 + 8 + 20 + 19 + 20 + 3 + 8 + 11 + 3


def test_resnet_byte_model_rows_and_target(monkeypatch):
    """The rows' bytes and ratio are the kernels' sums; the target reads the ratio from them."""
    br = _resnet_bytemodel(monkeypatch)
    rows = {r["impl"]: r for r in br.rows()}
    total = {impl: sum(k["reads"] + k["writes"] for k in br.step_kernels(impl)) for impl in ("dlkern", "eager")}
    assert {impl: r["model_bytes"] for impl, r in rows.items()} == total
    ratio = total["dlkern"] / total["eager"]
    assert rows["dlkern"]["ratio"] == pytest.approx(ratio) and rows["eager"]["ratio"] == 1.0
    floor, without_sgd = br.bounds()
    assert floor < without_sgd and floor < ratio  # the epilogue passes and split partials cost something
    result = {r["target"]: r for r in _load("targets").evaluate(list(rows.values()), on_cuda=False)}[
        "kernels: ResNet-18 byte model"]
    assert result["met"] == (ratio <= 0.6) and result["detail"].endswith(f"per step: {ratio:.2f}x")


# ------------------------------------------------------------------------------------------ argument checking
# Every option is checked before anything is measured (most before torch is imported), in argparse's one line
# and exit status 2: once, --batches 0 exited 0 after reporting a missed target on 0x32 shapes, --batches -4 failed
# after ~73 s on "negative dimension" and --ops nosuch ended in a bare KeyError.

SUITES = ["host", "maxpool", "model", "activations", "convbn", "cnn", "coverage", "accuracy", "kernels"]
CATALOG_NAMES = list(CATALOG)  # the host suite times every activation of dlkern's catalog, in its order


def _bench(args, tmp_path, timeout=120, **env):
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("DLKERN_")}, **env}
    command = [sys.executable, os.path.join(ROOT, "bench", "run.py"), *args, "--out", str(tmp_path / "out")]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def _usage_error(proc, tmp_path, message):
    """Exit 2, argparse's usage and one error line holding `message`, no traceback, nothing measured or written."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("usage: run.py") and lines[-1].startswith("run.py: error: "), proc.stderr
    assert message in lines[-1], lines[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--batches", "0"], "argument --batches: invalid value '0': expected a positive integer"),
    (["--batches", "-4"], "argument --batches: invalid value '-4': expected a positive integer"),
    (["--batches", "64,x"], "argument --batches: invalid value 'x'"),
    (["--batches", "64,2.5"], "argument --batches: invalid value '2.5'"),
    (["--batches", ","], "argument --batches: expected a comma-separated list"),
    (["--sizes", "13"], "argument --sizes: invalid value '13': sizes are powers of two of at least 14"),
    (["--sizes", "20,-2"], "argument --sizes: invalid value '-2'"),
    (["--sizes", "2^20"], "argument --sizes: invalid value '2^20'"),
    (["--threads", "0"], "argument --threads: invalid value '0': expected a positive integer"),
    (["--threads", "two"], "argument --threads: invalid value 'two'"),
    (["--suite", "nosuch"], f"argument --suite: invalid choice: 'nosuch' (choose from {', '.join(SUITES)})"),
    (["--suite", "host,nosuch"], "argument --suite: invalid choice: 'nosuch'"),
    (["--suite", ""], "argument --suite: expected a comma-separated list"),
    (["--suites", "cnn,nosuch"], f"argument --suites: invalid choice: 'nosuch' (choose from {', '.join(SUITES)})"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8' (choose from fp32, bf16, fp16, fp64)"),
    (["--dtype", "fp32,float32"], "argument --dtype: invalid choice: 'float32'"),
    (["--compile-modes", "fast"],
     "argument --compile-modes: invalid choice: 'fast' (choose from default, reduce-overhead, max-autotune, none)"),
    (["--compile-modes", "none,default"], "argument --compile-modes: none cannot be combined with a mode"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bad_option_is_a_usage_error(tmp_path, args, message):
    _usage_error(_bench(args, tmp_path, timeout=60), tmp_path, message)


@pytest.mark.parametrize("args, message", [
    (["--ops", "nosuch"], f"argument --ops: invalid choice: 'nosuch' for the host suite "
                          f"(choose from {', '.join(CATALOG_NAMES)})"),
    # swish_channel is a variant of the activations suite's own table, which the host suite does not time
    (["--ops", "relu,swish_channel"], "argument --ops: invalid choice: 'swish_channel' for the host suite"),
    (["--suite", "activations", "--ops", "relu,nosuch"], "argument --ops: invalid choice: 'nosuch' for the "
                                                         "activations suite (choose from relu, "),
])
def test_bad_ops_is_a_usage_error(tmp_path, args, message):
    """--ops is checked against the tables of the selected suites that time activations (dlkern's catalog for
    the host suite), once dlkern is imported."""
    _usage_error(_bench(args, tmp_path), tmp_path, message)


def test_bad_dlkern_variable_is_a_usage_error(tmp_path):
    """dlkern reads DLKERN_AUTOTUNE when imported: run.py imports it up front, so a bad spelling is said once, in
    one line, instead of failing every suite."""
    proc = _bench(["--suite", "activations", "--device", "cpu"], tmp_path, DLKERN_AUTOTUNE="garbage")
    _usage_error(proc, tmp_path, "DLKERN_AUTOTUNE='garbage': expected one of 1, 0, true, false, yes, no, on, off")


def test_edge_options_accepted(tmp_path):
    """The smallest allowed values and the activations suite's own variant pass the checks (on a CPU that
    suite then skips itself: nothing here is slow)."""
    proc = _bench(["--suite", "activations", "--ops", "swish_channel,relu", "--dtype", " fp32, bf16 ", "--sizes", "14",
                   "--batches", "1", "--compile-modes", "default", "--threads", "1", "--device", "cpu"], tmp_path,
                  timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "activations: skipped the whole suite" in proc.stdout
    assert (tmp_path / "out" / "results.csv").exists()


def test_suites_alias_and_gpu_only_cnn(tmp_path):
    """--suites is --suite; the cnn suite, CUDA only, says on a CPU that it is skipped, and the run succeeds."""
    proc = _bench(["--suites", "cnn", "--device", "cpu", "--threads", "1"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cnn: skipped the whole suite: CUDA only" in proc.stdout
    assert "- cnn: the whole suite: CUDA only" in (tmp_path / "out" / "targets.md").read_text()


# ------------------------------------------------------------------------------------------ the cnn suite's steps
# The suite times on a GPU only; what it times is built by cnn.build_step, checked here on a CPU (fp32, batch 2).


@pytest.mark.parametrize("name", ["resnet18", "cifar-net"])
def test_cnn_steps_train(monkeypatch, name):
    """The eager and dlkern.convert-ed training steps of a cnn-suite model update the trainable parameters (the
    CIFAR net's frozen BatchNorm weights and whitening filter stay), and dlkern's model carries its report."""
    import torch

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    cnn = _load("cnn")
    x, y = cnn.inputs(2, "cpu")
    assert x.is_contiguous(memory_format=torch.channels_last)
    for impl in ("eager", "dlkern"):
        step = cnn.build_step(name, impl, "train-step", torch.float32, x, y)
        before = {n: p.detach().clone() for n, p in step.model.named_parameters()}
        step()
        for n, p in step.model.named_parameters():
            assert torch.equal(p, before[n]) != p.requires_grad, (impl, n)
        report = getattr(step.model, "dlkern_report", None)
        assert (report is not None) == (impl == "dlkern")
        if report is not None:
            assert report.sites == {"resnet18": 20, "cifar-net": 6}[name] and report.fused
        infer = cnn.build_step(name, impl, "inference", torch.float32, x, y)
        infer()
        assert not infer.model.training
