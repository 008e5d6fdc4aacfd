"""Build megallama and its C++ extensions.

Every folder ``csrc/NAME`` becomes the extension module ``megallama._NAME``: its ``*.cpp`` files
always, its ``*.cu`` files only when torch is a CUDA build and a CUDA toolkit is found. A compile
error stops the install; there is no pure-Python fallback for a failed build.

Install with ``pip install --no-build-isolation -e .`` so the torch already installed is the one
built against.
"""
import glob
import os
import platform

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - a build-time message, not library code
    raise SystemExit(
        "megallama's C++ extensions build against the installed torch: install torch==2.13.0 "
        "first, then `pip install --no-build-isolation -e .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))
WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("MEGALLAMA_NO_CUDA") != "1"


def cxx_flags():
    flags = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function"]
    # The extension is built on the machine that runs it (pip install -e), so tune for its CPU
    # unless a portable build is asked for.
    if os.environ.get("MEGALLAMA_PORTABLE") != "1" and platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    return flags


def extensions():
    # MEGALLAMA_EXTENSIONS=ops,data builds only those folders (a developer rebuilding one part);
    # the default is all of them.
    only = {n for n in os.environ.get("MEGALLAMA_EXTENSIONS", "").split(",") if n}
    exts = []
    for folder in sorted(glob.glob(os.path.join(HERE, "csrc", "*"))):
        name = os.path.basename(folder)
        if not os.path.isdir(folder) or (only and name not in only):
            continue
        cpp = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(folder, "*.cpp")))
        cu = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(folder, "*.cu")))
        if not cpp:
            continue
        if WITH_CUDA and cu:
            exts.append(CUDAExtension(
                f"megallama._{name}", cpp + cu,
                define_macros=[("MEGALLAMA_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags(), "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
                extra_link_args=["-fopenmp"],
            ))
        else:
            exts.append(CppExtension(
                f"megallama._{name}", cpp,
                extra_compile_args=cxx_flags(), extra_link_args=["-fopenmp"],
            ))
    return exts


setup(
    name="megallama",
    version="0.1.0",
    description="The LLaMA pretraining recipe as a Megatron-style codebase that runs and is tested on CPU",
    packages=find_packages(include=["megallama", "megallama.*"]),
    python_requires=">=3.10",
    # torch.load(weights_only=True) is a security boundary only from torch 2.6 (CVE-2025-32434)
    install_requires=["torch>=2.6", "numpy", "sentencepiece", "protobuf", "tqdm", "safetensors"],
    extras_require={
        "clean": ["fasttext-numpy2", "datasketch", "warcio", "mwparserfromhell", "zstandard", "kenlm"],
        "train": ["tensorboard", "matplotlib"],
        "cluster": ["ray==2.60.0"],  # --executor ray for the data tools
        "eval": ["lm-eval==0.4.13", "transformers"],  # tools/run_lm_eval.py (--model megallama)
        "wandb": ["wandb"],  # megallama.pretrain --wandb-project
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
