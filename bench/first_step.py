"""Import-to-first-step time: seconds from ``import dlkern`` to the end of the first MnistCNN training step.

    python bench/first_step.py [--out FILE] [--device cuda|cpu] [--batch 64] [--cache-dir DIR]

dlkern's Triton kernels compile on their first launch, on the machine that runs them, so a fresh process on a
fresh machine pays for every variant a training step launches (README: an fp32 MnistCNN training + eval run
compiles 21 variants, 5 CPU s for sm_90). This measures it the way a user meets it, each run in a fresh process:

- ``cold``: an empty Triton cache (a new TRITON_CACHE_DIR: a new temporary folder unless --cache-dir is given);
- ``warm``: the same cache again, in a new process: what is left when nothing compiles (import, CUDA context,
  module load, the launch plans' first calls).

Each run times, after ``import torch``: ``import dlkern`` (and its extension), building the model and moving it
to the device (the CUDA context), and the first training step (zero_grad, forward, cross-entropy, backward,
Adam) up to a device synchronization; then a second step, for scale. Prints and appends to FILE:

    import-to-first-step: 6.1 s (cold Triton cache: import dlkern 1.0 s, model + device 0.9 s, first step 4.2 s,
    2nd step 3.9 ms; 15 kernels compiled)

On a CPU dlkern's Triton ops run their PyTorch composite (no compiling): the figure then says nothing about
compilation and the line says so.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _one_run(device, batch):
    """One measurement in this process: a dict of seconds (called with TRITON_CACHE_DIR already set)."""
    import torch

    start = time.perf_counter()
    import dlkern
    from dlkern.models import MnistCNN

    imported = time.perf_counter()
    torch.manual_seed(0)
    model = MnistCNN(backend="dlkern").to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    ready = time.perf_counter()

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sync()

    step()
    first = time.perf_counter()
    step()
    second = time.perf_counter()
    return dict(import_dlkern_s=imported - start, model_s=ready - imported, first_step_s=first - ready,
                import_to_first_step_s=first - start, second_step_ms=1e3 * (second - first),
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                torch=torch.__version__, cuda_kernels=bool(dlkern.build_info.get("with_cuda")))


def _compiled(cache_dir):
    """Kernels in a Triton cache folder: one .cubin (CUDA) or .hsaco (ROCm) per compiled variant."""
    return sum(f.endswith((".cubin", ".hsaco")) for _, _, files in os.walk(cache_dir) for f in files)


def _line(label, r, compiled):
    what = "PyTorch composite on the CPU: nothing compiles" if r["device"] == "cpu" else f"{compiled} kernels compiled"
    return (f"import-to-first-step: {r['import_to_first_step_s']:.1f} s ({label} Triton cache: import dlkern "
            f"{r['import_dlkern_s']:.1f} s, model + device {r['model_s']:.1f} s, first step {r['first_step_s']:.1f} s, "
            f"2nd step {r['second_step_ms']:.1f} ms; {what}; {r['device']}, torch {r['torch']})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="append the result lines to this file")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when a GPU is visible")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cache-dir", help="the Triton cache to start from (must be empty for a cold run); default: "
                                       "a new temporary folder")
    p.add_argument("--runs", default="cold,warm", help="cold, warm or both, in order (default cold,warm)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one measurement, printed as JSON for the parent
        print("RESULT " + json.dumps(_one_run(args.device, args.batch)), flush=True)
        return 0
    device = args.device
    if device is None:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        device = "cuda" if probe.stdout.strip() == "True" else "cpu"
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="triton-cold-")
    if _compiled(cache_dir):
        print(f"note: {cache_dir} already holds compiled kernels: the 'cold' run is not cold")
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    lines, status = [], 0
    for label in [r.strip() for r in args.runs.split(",") if r.strip()]:
        before = _compiled(cache_dir)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--device", device,
                               "--batch", str(args.batch)], env=env, capture_output=True, text=True)
        results = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not results:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            lines.append(f"import-to-first-step: FAILED ({label} Triton cache; exit status {proc.returncode})")
            status = 1
        else:
            lines.append(_line(label, json.loads(results[-1]), _compiled(cache_dir) - before))
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
