"""Build and load pagellm's CPU kernels (pagellm/csrc/cpu_ops.c) through ctypes.

The library is compiled once per source version and machine into pagellm's cache
folder with the system C compiler; if there is no compiler, no AVX2/FMA, or the build
fails, ``load()`` returns None and every op falls back to its torch twin. Set
``PAGELLM_NATIVE=0`` to turn the kernels off.

torch is imported before the library is loaded so the kernels bind to the OpenMP
runtime torch already uses (both ask for ``libgomp.so.1``) and share its thread team.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources

import torch  # noqa: F401  (loads libgomp first)

from pagellm.utils import cache_dir, run_once

logger = logging.getLogger(__name__)

_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F = ctypes.c_float

_SIGNATURES = {
    "pagellm_linear_f32": [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _INT],
    "pagellm_rms_norm_f32": [_P, _P, _P, _P, _I64, _I64, _F, _INT],
    "pagellm_rope_f32": [_P, _P, _I64, _P, _I64, _I64, _I64, _I64, _INT],
    "pagellm_silu_and_mul_f32": [_P, _P, _I64, _I64, _INT],
    "pagellm_write_kv_f32": [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64],
    "pagellm_paged_attention_f32": [
        _P, _I64, _P, _P, _P, _I64, _P, _P, _P, _P,
        _I64, _I64, _I64, _I64, _I64, _I64, _F, _INT,
    ],
}  # fmt: skip


def _cpu_supports_avx2() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    words = set(flags.split())
    return "avx2" in words and "fma" in words


def _compile(src: str, out_path: str, compiler: str) -> None:
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out_path))
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *_FLAGS, src, "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, out_path)  # atomic: concurrent builders never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@run_once
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built here."""
    if os.environ.get("PAGELLM_NATIVE", "1") == "0":
        logger.info("native CPU kernels disabled by PAGELLM_NATIVE=0")
        return None
    if not _cpu_supports_avx2():
        logger.info("native CPU kernels need x86-64 Linux with AVX2 and FMA; using torch ops")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found; pagellm uses torch ops on CPU (slower decode)")
        return None
    src_ref = resources.files("pagellm").joinpath("csrc/cpu_ops.c")
    source = src_ref.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + compiler.encode()).hexdigest()[:16]
    out_path = os.path.join(cache_dir("kernels", key), "libpagellm_cpu.so")
    if not os.path.exists(out_path):
        with resources.as_file(src_ref) as src_path:
            try:
                _compile(str(src_path), out_path, compiler)
            except (subprocess.SubprocessError, OSError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                logger.warning("building the CPU kernels failed; using torch ops: %s", detail)
                return None
        logger.info("built CPU kernels into %s", out_path)
    lib = ctypes.CDLL(out_path)
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    return lib
