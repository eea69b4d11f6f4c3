"""dlkern's benchmark: every suite side by side with PyTorch, in one run, on this machine's device.

    python bench/run.py [--suite maxpool,activations,convbn] [--quick] [--out DIR]

Prints a table per suite and writes every row, with the device, versions, commit and time, to DIR/results.csv.
Without a GPU it runs what is meaningful on the CPU and says what it skipped.
"""

import argparse
import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

SUITES = ["maxpool", "activations", "convbn"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated, from {SUITES}")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for results.csv")
    args = parser.parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = set(suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s) {sorted(unknown)}; choose from {SUITES}")

    from timing import environment

    env = environment(args.device)
    print("dlkern benchmark: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if args.device != "cuda":
        print("no GPU: timings are CPU timings; the Triton suites need a GPU and are skipped")

    rows = []
    for suite in suites:
        if suite == "maxpool":
            import maxpool

            maxpool.run_suite(args.device, args.quick, rows)
        elif args.device != "cuda":
            print(f"\n{suite}: skipped, its Triton kernels need a CUDA GPU (the CPU interpreter is not a benchmark)")
        elif suite == "activations":
            import activations

            activations.run_suite(args.quick, None, rows)
        elif suite == "convbn":
            import convbn

            convbn.run_suite(args.quick, rows)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.csv")
    fields = list(env) + sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**env, **r})
    print(f"\n{len(rows)} rows written to {path}")


if __name__ == "__main__":
    main()
