"""Builds robust_ext._C against the installed torch (use ``pip install --no-build-isolation .``).

ROBUST_EXT_BUILD picks what is built:
  auto    (default) CPU kernels; CUDA kernels too when torch has CUDA and nvcc is found
  cuda    CPU + CUDA kernels even on a machine without a GPU (fails if nvcc is missing)
  cpu     CPU kernels only
  python  no extension: robust_ext runs on its pure-PyTorch reference implementation

ROBUST_EXT_CPU_ISA picks the CPU loops' instruction sets (x86-64 with GCC):
  auto      (default) AVX-512, AVX2 and baseline clones of every loop, the best picked at run time
  avx2      AVX2 (x86-64-v3) only; baseline  baseline x86-64 only -- for testing, on an AVX-512 machine,
            the code the other clones hold (.ci/check_isa.sh); an avx2 build needs an AVX2 CPU to run
"""
import glob
import os
import sys

from setuptools import setup

MODES = ("auto", "cuda", "cpu", "python")
ISAS = {"auto": [], "avx2": [("RX_ISA_V3", None)], "baseline": [("RX_ISA_BASELINE", None)]}


def _say(msg):
    print(f"robust_ext build: {msg}", file=sys.stderr, flush=True)


def ext_modules_and_cmdclass():
    mode = os.environ.get("ROBUST_EXT_BUILD", "auto").strip().lower()
    if mode not in MODES:
        raise SystemExit(f"ROBUST_EXT_BUILD must be one of {', '.join(MODES)}, got {mode!r}")
    isa = os.environ.get("ROBUST_EXT_CPU_ISA", "auto").strip().lower()
    if isa not in ISAS:
        raise SystemExit(f"ROBUST_EXT_CPU_ISA must be one of {', '.join(ISAS)}, got {isa!r}")
    if mode == "python":
        _say("mode=python: no extension; the pure-PyTorch reference serves every op")
        return [], {}

    import torch
    from torch.utils import cpp_extension as ce

    has_cuda_torch = torch.version.cuda is not None
    nvcc_found = ce.CUDA_HOME is not None
    if mode == "cuda" and not (has_cuda_torch and nvcc_found):
        raise SystemExit(
            "ROBUST_EXT_BUILD=cuda needs a CUDA build of torch and nvcc "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={ce.CUDA_HOME})")
    with_cuda = mode == "cuda" or (mode == "auto" and has_cuda_torch and nvcc_found)

    here = os.path.dirname(os.path.abspath(__file__))
    # Every op family is a folder of csrc/ (its math and op body) with cpu/ and cuda/ kernels beside: the
    # sources are whatever is there, so a new kernel file is built without editing this list.
    sources = sorted(glob.glob("csrc/**/*.cpp", root_dir=here, recursive=True))
    torch_version = torch.__version__.split("+")[0]
    # -ffp-contract=off / --fmad=false: no fused multiply-add, so the kernels round exactly as
    # reference.py does (fp32/fp64 results are bit-identical). -fno-math-errno: sqrt vectorizes (no
    # kernel reads errno).
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
           f'-DROBUST_EXT_TORCH_VERSION="{torch_version}"']
    nvcc = ["-O3", "--fmad=false", "--extended-lambda", "--expt-relaxed-constexpr", "-lineinfo"]
    macros = list(ISAS[isa])
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/cuda/*.cu", root_dir=here, recursive=True))
        macros.append(("ROBUST_EXT_WITH_CUDA", None))
        ext_cls = ce.CUDAExtension
    else:
        ext_cls = ce.CppExtension
    _say(f"mode={mode} torch={torch.__version__} cuda_torch={has_cuda_torch} nvcc={ce.CUDA_HOME} "
         f"-> CPU kernels: yes (ISA {isa}), CUDA kernels: {'yes' if with_cuda else 'no'}; "
         f"arch list: {os.environ.get('TORCH_CUDA_ARCH_LIST', 'torch default') if with_cuda else '-'}")
    ext = ext_cls(
        name="robust_ext._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
