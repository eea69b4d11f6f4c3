"""Compiles every Triton kernel dlkern launches for a real GPU (sm_90), without one.

Run as a script (tests/test_gpu_compile.py does), never with TRITON_INTERPRET: the kernels must be real
JITFunctions. A representative workload runs on CPU tensors with dlkern's launcher replaced by a recorder, so
every kernel is seen with the arguments and constexprs its launcher really passes; each distinct launch is then
compiled with triton.compile for the GPU target (first and last autotuner config). This catches what the
interpreter accepts and a GPU compiler rejects (tl.dot shapes, dtype mixes, non-constexpr globals, ...).
Prints one line per compiled kernel variant and exits 1 if any failed.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import dlkern  # noqa: E402
from dlkern.ops import triton_support  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}

recorded = {}


def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def record(kernel, grid, *args, **kwargs):
    """Stands in for triton_support.launch: notes the launch (per autotuner config), launches nothing."""
    fn = jit_function(kernel)
    configs = getattr(kernel, "configs", None) or [None]
    if len(configs) > 1:
        # GEMM tile shapes decide what tl.dot gets: compile the smallest and the largest; elementwise kernels'
        # configs only change BLOCK and num_warps: one is enough.
        configs = [configs[0], configs[-1]] if "conv" in fn.__name__ else configs[:1]
        kernel.best_config = configs[0]  # launchers may read the tuned tile sizes back
    names = [p.name for p in fn.params]
    for config in configs:
        values = dict(zip(names, args))
        values.update(kwargs)
        options = {}
        if config is not None:
            values.update(config.kwargs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        signature, constexprs = {}, {}
        for p in fn.params:
            value = values[p.name] if p.name in values else p.default
            if p.is_constexpr or value is None:  # Triton specializes a None argument as a constexpr
                signature[p.name] = "constexpr"
                constexprs[p.name] = value
            else:  # an annotated parameter (p0: tl.float64) is compiled as annotated, as on a GPU
                signature[p.name] = p.annotation_type or arg_type(value)
        key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(options.items()))
        recorded[key] = (fn, signature, constexprs, options)


def workload():
    """One forward and backward of every op family, in the dtypes the GPU path supports."""
    F = dlkern.functional
    every_activation = (F.sigmoid, F.tanh, F.relu, F.leaky_relu, F.elu, F.softplus, F.silu, F.gelu, F.hardsigmoid,
                        F.hardtanh, F.hard_logistic, lambda t: F.gelu(t, approximate="tanh"), lambda t: F.swish(t, 1.5))
    for dtype, activations in ((torch.float32, every_activation), (torch.bfloat16, (F.sigmoid, F.gelu)),
                               (torch.float64, (F.tanh, F.softplus))):
        x = torch.randn(4, 8, 5, 6, dtype=dtype, requires_grad=True)
        for fn in activations:
            fn(x).sum().backward()
        w = torch.rand(8, dtype=dtype, requires_grad=True)
        F.prelu(x, w).sum().backward()
        F.swish(x, w).sum().backward()
        F.relu(x.detach().clone(), inplace=True)
        F.relu(x.detach().transpose(2, 3)[:, :, ::2])  # strided
    for dtype in (torch.float32, torch.float64):
        for c_in, padding, act in ((1, 1, "relu"), (32, 0, "gelu")):
            block = dlkern.nn.ConvBNReLU2d(c_in, 32, 3, padding=padding, activation=act).to(dtype)
            x = torch.randn(2, c_in, 10, 10, dtype=dtype, requires_grad=c_in > 1)
            block(x).sum().backward()
            block.eval()
            block(x).sum().backward()
            with torch.no_grad():  # inference: BatchNorm applied in the conv kernel's epilogue (BN_EVAL)
                block(x)


def main():
    triton_support.runs_triton = lambda tensor, op_name: True
    triton_support.launch = record
    for module in list(sys.modules.values()):  # the ops imported launch/runs_triton by name
        if getattr(module, "__name__", "").startswith("dlkern.ops.") and module is not triton_support:
            for name, replacement in (("launch", record), ("runs_triton", triton_support.runs_triton)):
                if hasattr(module, name):
                    setattr(module, name, replacement)
    with torch.autocast("cpu", enabled=False):
        workload()
    failures = 0
    for (name, _, constexprs, options), (fn, signature, consts, opts) in sorted(recorded.items(), key=str):
        try:
            triton.compile(ASTSource(fn, signature, consts), target=TARGET, options=opts or None)
            print(f"ok   {name} {dict(constexprs)} {dict(options)}")
        except Exception as e:  # noqa: BLE001  (report every failing variant, then fail)
            failures += 1
            print(f"FAIL {name} {dict(constexprs)} {dict(options)}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"{len(recorded)} kernel variants, {failures} failed")
    return 1 if failures or not recorded else 0


if __name__ == "__main__":
    sys.exit(main())
