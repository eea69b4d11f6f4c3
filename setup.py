"""Build dlkern and its C++/CUDA extension ``dlkern._C``.

The CPU kernels are always built. The CUDA kernels are built whenever torch is a CUDA build and a CUDA toolkit
with nvcc is found -- a GPU need not be visible (CI has none). ``DLKERN_CPU_ONLY=1`` forces a CPU-only build.
Build against the torch you run with: ``pip install --no-build-isolation -e .``.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # Ampere and Hopper SASS, plus PTX that newer GPUs JIT-compile


def _log(msg):
    print(f"dlkern setup: {msg}", file=sys.stderr)


def _has_runtime_headers(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _toolkits_from_nvcc_wrapper(nvcc):
    """Toolkit folders named by an ``nvcc`` on the PATH: its own parent, the target of a symlink, and any
    ``.../bin/nvcc`` a wrapper script execs (our machines ship such a two-line wrapper)."""
    real = os.path.realpath(nvcc)
    yield os.path.dirname(os.path.dirname(real))
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return
    if head.startswith(b"#!"):
        for path in re.findall(rb"(/[^\s\"']+)/bin/nvcc", head):
            yield path.decode()


def find_cuda_home():
    """The CUDA toolkit that really has the runtime headers, or None.

    torch guesses CUDA_HOME from the ``nvcc`` on the PATH, which on our machines is a wrapper outside the
    toolkit; that guess has no headers and the build would fail deep inside nvcc.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if _has_runtime_headers(home):
                return home
            _log(f"{var}={home} has no include/cuda_runtime.h; ignoring it")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += list(_toolkits_from_nvcc_wrapper(nvcc))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    for home in candidates:
        if _has_runtime_headers(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _env():
    """dlkern/_env.py, dlkern's reader of its DLKERN_* variables, loaded by path (dlkern is not built yet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dlkern_setup_env", os.path.join(ROOT, "dlkern", "_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configure_cuda(torch):
    """Decide whether to build CUDA kernels; set CUDA_HOME and the arch list for torch.utils.cpp_extension."""
    if _env().flag("DLKERN_CPU_ONLY"):
        _log("DLKERN_CPU_ONLY is set: building the CPU kernels only")
        return False
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is not a CUDA build: building the CPU kernels only")
        return False
    home = find_cuda_home()
    if home is None:
        _log(
            "no CUDA toolkit with include/cuda_runtime.h and bin/nvcc was found (set CUDA_HOME to one): "
            "building the CPU kernels only"
        )
        return False
    os.environ["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            archs = ";".join(f"{major}.{minor}" for major, minor in caps)
        else:
            archs = DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    _log(f"CUDA toolkit {home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return True


def import_environment_torch():
    """The torch installed in the environment being installed into, or None.

    The extension must be compiled against the torch it will run with. pip's build isolation hides the
    environment's site-packages from this script (pip install -e . without --no-build-isolation), so ask the same
    interpreter, without the isolation overlay, where its torch lives, and import that one.
    """
    try:
        import torch

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = subprocess.run(
        [sys.executable, "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
        env=env, capture_output=True, text=True, check=False,
    )
    if probe.returncode != 0:
        return None
    sys.path.append(probe.stdout.strip())
    try:
        import torch

        _log(f"using the environment's torch {torch.__version__} from {probe.stdout.strip()} (build isolation)")
        return torch
    except ImportError:
        return None


def extension_setup_kwargs():
    torch = import_environment_torch()
    if torch is None:
        _log("torch is not installed: dlkern will install without its extension and refuse to import. Install "
             "torch, then rebuild: pip install --no-build-isolation -e .")
        return {}

    with_cuda = configure_cuda(torch)
    # Import only now: cpp_extension reads CUDA_HOME when it is first imported.
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    # -fopenmp makes at::parallel_for (OpenMP backend in torch's wheels) really run in parallel.
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    extension_cls = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
        define_macros.append(("DLKERN_WITH_CUDA", "1"))
        extension_cls = cpp_extension.CUDAExtension

    ext = extension_cls(
        "dlkern._C",
        sources,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )

    build_info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_home": os.environ.get("CUDA_HOME") if with_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "python": sys.version.split()[0],
    }

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension that also records, beside the built library, what it was built against."""

        def run(self):
            super().run()
            out_dir = os.path.dirname(self.get_ext_fullpath("dlkern._C"))
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                json.dump(build_info, f, indent=2)
                f.write("\n")
            _log(f"built {build_info}")

    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
        "options": {"bdist_wheel": {"py_limited_api": "cp39"}},
    }


setup(
    name="dlkern",
    version="0.1.0",
    description="Fused Triton kernels and a C++/CUDA max-pool extension for classic CNN building blocks",
    python_requires=">=3.10",
    packages=["dlkern", "dlkern.ops", "dlkern.nn", "dlkern.kernels"],
    package_dir={"dlkern.kernels": "kernels"},
    package_data={"dlkern": ["_build_info.json"]},
    # The supported range (README, "Supported versions"): torch 2.11 to 2.14 and the Triton each ships with.
    install_requires=["torch>=2.11,<2.15", "triton>=3.6,<3.9", "numpy"],
    extras_require={"train": ["torchvision", "tqdm", "matplotlib"]},
    **extension_setup_kwargs(),
)
