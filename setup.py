"""Builds edaan_fast._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found
(or FORCE_CUDA=1). Build with the installed torch:

    pip install --no-build-isolation -e .

Environment switches:
    FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible (needs nvcc)
    EDAAN_FAST_CPU_ONLY=1   never build the CUDA kernels
    CUDA_HOME               the CUDA toolkit (default: the one matching torch.version.cuda under
                            /usr/local, else nvcc on PATH)
    TORCH_CUDA_ARCH_LIST    GPU architectures (default without a visible GPU: "8.0;9.0+PTX";
                            the list torch's build passes to nvcc is recorded in
                            _build_info.json and in the library's _build_info op as
                            "cuda_arch_list"; require_cuda_kernels checks it against the GPU)
    MAX_JOBS                parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGE = "edaan_fast"


def _locate_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit before torch.utils.cpp_extension looks for one."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import torch

    wanted = [f"/usr/local/cuda-{torch.version.cuda}"] if torch.version.cuda else []
    candidates = wanted + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # a real toolkit's nvcc (not a wrapper script in /usr/local/bin) comes first
        candidates.insert(0, str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.isdir(
            os.path.join(home, "lib64")
        ):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda() -> bool:
    if os.environ.get("EDAAN_FAST_CPU_ONLY", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit "
                "(the directory holding bin/nvcc)"
            )
        if torch.version.cuda is None:
            raise RuntimeError(
                f"FORCE_CUDA=1 but the installed torch {torch.__version__} has no CUDA support"
            )
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _wheel_cuda_includes() -> list[str]:
    """CUDA headers shipped in the torch wheel's nvidia-* packages (cusparse.h and friends)."""
    try:
        import nvidia
    except ImportError:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    candidates = [os.path.join(base, f"cu{major}", "include") for base in nvidia.__path__]
    return [d for d in candidates if major and os.path.isdir(d)]


def _arch_list_from_flags(flags: list[str]) -> str | None:
    """The arch list ("8.0;9.0+PTX") that nvcc's -gencode flags build: a cubin per ``sm_XY``,
    "+PTX" where ``compute_XY`` PTX is embedded as well."""
    order: list[str] = []
    ptx: set[str] = set()
    for flag in flags:
        m = re.search(r"arch=compute_\w+,code=(sm|compute)_(\d+)(\d)([a-z]?)", flag)
        if not m:
            continue
        name = f"{m.group(2)}.{m.group(3)}{m.group(4)}"  # sm_90a -> 9.0a, sm_100 -> 10.0
        if name not in order:
            order.append(name)
        if m.group(1) == "compute":
            ptx.add(name)
    return ";".join(n + ("+PTX" if n in ptx else "") for n in order) or None


def _cuda_arch_list() -> str | None:
    """The architectures torch's build will actually pass to nvcc (TORCH_CUDA_ARCH_LIST, or the
    visible GPUs' when it is unset), not merely the environment variable."""
    try:
        return _arch_list_from_flags(cpp_extension._get_cuda_arch_flags())
    except Exception:  # a private helper of torch: fall back to the variable  # noqa: BLE001
        return os.environ.get("TORCH_CUDA_ARCH_LIST")


def _extension():
    with_cuda = _want_cuda()
    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-DEDAAN_FAST_PYTHON_MODULE"]
    extra = {"cxx": cxx}
    kwargs: dict = {"extra_link_args": ["-fopenmp"], "include_dirs": [str(ROOT / "csrc")]}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # sm_80 and sm_90 kernels, plus compute_90 PTX that the driver compiles for newer
            # GPUs (Blackwell); a T4 (sm_75) needs TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0+PTX"
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
        cxx.append("-DEDAAN_FAST_WITH_CUDA")
        arch = _cuda_arch_list()
        if arch:  # into the _build_info op's JSON, read by require_cuda_kernels
            cxx.append("-DEDAAN_FAST_CUDA_ARCH_LIST=" + arch.replace(";", ","))
        # --fmad=false: the shared header math (csrc/ops/*.h) rounds as on the CPU, which
        # compiles it without contraction (-ffp-contract=off below)
        extra["nvcc"] = ["-O3", "-lineinfo", "-DEDAAN_FAST_WITH_CUDA", "--expt-relaxed-constexpr",
                         "--fmad=false"]
        kwargs["include_dirs"] += _wheel_cuda_includes()
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return with_cuda, ext_cls(f"{PACKAGE}._C", sources, extra_compile_args=extra, **kwargs)


WITH_CUDA, EXTENSION = _extension()
CUDA_ARCH_LIST = _cuda_arch_list() if WITH_CUDA else None


class BuildExtension(cpp_extension.BuildExtension):
    """Also records what the library is built against, readable even if it fails to load."""

    def run(self):
        super().run()
        info = {
            "torch": torch.__version__.split("+")[0],
            "cuda": torch.version.cuda if WITH_CUDA else None,
            "with_cuda": WITH_CUDA,
            "cuda_arch_list": CUDA_ARCH_LIST,
        }
        for target in {ROOT / PACKAGE, Path(self.build_lib) / PACKAGE}:
            if target.is_dir():
                (target / "_build_info.json").write_text(json.dumps(info) + "\n")


setup(
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    package_data={PACKAGE: ["_build_info.json", "py.typed"]},
)
