"""Build and load pagellm's CPU kernels (pagellm/csrc/*.c) through ctypes, per instruction set.

The kernels are written once over the vector layer in ``csrc/simd.h`` and compiled for
each instruction set the host supports (see ``ISAS``, best first). ``load()`` returns
the library for the best one (or the one named by ``PAGELLM_CPU_ISA``); tests load every
supported one. A build is cached in pagellm's cache folder under a key made of the
sources, the compiler, its flags and the host's CPU features, so a home directory shared
by two machines never loads a build made for the other. Where there is no x86-64 with
AVX2 + FMA, no compiler, or the build fails, ``load()`` returns None with a logged
reason and every op falls back to its torch twin. ``PAGELLM_NATIVE=0`` turns the
kernels off.

torch is imported before a library is loaded so the kernels bind to the OpenMP runtime
torch already uses (both ask for ``libgomp.so.1``) and share its thread team.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources

import torch  # noqa: F401  (loads libgomp first)

from pagellm.utils import cache_dir

logger = logging.getLogger(__name__)

_BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


@dataclass(frozen=True)
class IsaSpec:
    """One build of the kernels: the CPU features it needs and the flags that enable them."""

    name: str
    required: tuple[str, ...]
    """/proc/cpuinfo flags the build cannot run without."""
    flags: tuple[str, ...]
    """Compiler flags for the required features."""
    optional: tuple[tuple[str, str], ...] = ()
    """(cpu flag, compiler flag) pairs added when the host has the feature (e.g. VNNI)."""

    def compile_flags(self, features: frozenset[str]) -> list[str]:
        extra = [flag for feature, flag in self.optional if feature in features]
        return [*_BASE_FLAGS, *self.flags, *extra]


# Best first. Each kernel source compiles for every entry (simd.h picks the vector width).
ISAS: tuple[IsaSpec, ...] = (
    IsaSpec(
        "avx512",
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
        (
            ("avx512_vnni", "-mavx512vnni"),
            ("avx_vnni", "-mavxvnni"),
            ("avx512_bf16", "-mavx512bf16"),
        ),
    ),
    IsaSpec(
        "avx2",
        ("avx2", "fma", "f16c"),
        ("-mavx2", "-mfma", "-mf16c"),
        (("avx_vnni", "-mavxvnni"),),
    ),
)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F = ctypes.c_float

# name -> (argument types, return type)
_SIGNATURES: dict[str, tuple[list[type], type | None]] = {
    "pagellm_isa": ([], ctypes.c_char_p),
    "pagellm_read_sum": ([_P, _I64, _INT], _F),
    "pagellm_peak_ops": ([_INT, _I64, _INT], ctypes.c_double),
    "pagellm_linear_f32": ([_P, _I64, _P, _P, _P, _I64, _I64, _I64, _INT], None),
    "pagellm_linear_half": ([_P, _I64, _P, _INT, _P, _P, _I64, _I64, _I64, _INT], None),
    "pagellm_has_bf16_dot": ([], _INT),
    "pagellm_set_bf16_dot": ([_INT], _INT),
    "pagellm_rms_norm_f32": ([_P, _P, _P, _P, _I64, _I64, _F, _INT], None),
    "pagellm_rope_f32": ([_P, _P, _I64, _P, _I64, _I64, _I64, _I64, _INT], None),
    "pagellm_silu_and_mul_f32": ([_P, _P, _I64, _I64, _INT], None),
    "pagellm_lora_apply": ([_P, _P, _I64, _I64, _P, _I64, _INT], None),
    "pagellm_write_kv": ([_P, _I64, _P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _INT], None),
    "pagellm_q_has_vnni": ([], _INT),
    "pagellm_q_tile_bytes": ([_INT, _INT, _INT], _I64),
    "pagellm_quantize_q8": ([_P, _I64, _I64, _I64, _P, _P, _P, _INT], None),
    "pagellm_qlinear": ([
        _P, _P, _P, _I64, _I64, _P, _I64, _INT, _INT, _INT, _P, _I64, _P, _INT,
    ], None),
    "pagellm_qlinear_f32": ([_P, _I64, _I64, _P, _I64, _P, _INT], None),
    "pagellm_llama_stack": ([_P, _P, _P, _I64, _P, _P, _I64, _P, _P, _P, _I64, _INT], None),
    "pagellm_q_dequant_rows": ([_P, _I64, _INT, _INT, _INT, _P, _I64, _P, _INT], None),
    "pagellm_paged_attention": ([
        _P, _I64, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _P,
        _I64, _I64, _I64, _I64, _I64, _I64, _F, _INT, _I64, _F, _INT,
    ], None),
}  # fmt: skip


# Mirrors of the descriptors in csrc/llama_stack.c (field order and types must match).
MAX_RUNS = 4


class RunDesc(ctypes.Structure):
    _fields_ = [
        ("packed", _P), ("weight", _P), ("bias", _P), ("perm", _P),
        ("start", _I64), ("end", _I64), ("wtype", _I64),
    ]  # fmt: skip


class LinearDesc(ctypes.Structure):
    _fields_ = [
        ("num_runs", _I64), ("in_features", _I64), ("out_features", _I64),
        ("runs", RunDesc * MAX_RUNS),
    ]  # fmt: skip


class LayerDesc(ctypes.Structure):
    _fields_ = [
        ("input_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P),
        ("qkv", LinearDesc), ("o", LinearDesc), ("gate_up", LinearDesc), ("down", LinearDesc),
        ("k_cache", _P), ("v_cache", _P), ("k_scale", _P), ("v_scale", _P),
        ("window", _I64), ("softcap", _F), ("pad_", ctypes.c_int32),
    ]  # fmt: skip


class StackDesc(ctypes.Structure):
    _fields_ = [
        ("num_layers", _I64), ("hidden", _I64), ("num_heads", _I64), ("num_kv_heads", _I64),
        ("head_dim", _I64), ("rot_dim", _I64), ("intermediate", _I64), ("block_size", _I64),
        ("eps", _F), ("attn_scale", _F), ("kvt", ctypes.c_int32), ("pad_", ctypes.c_int32),
        ("cos_sin", _P), ("final_norm", _P), ("layers", ctypes.POINTER(LayerDesc)),
        ("lora", _P), ("lora_groups", _I64),
    ]  # fmt: skip


@functools.cache
def cpu_features() -> frozenset[str]:
    """The host's CPU feature flags (empty where they cannot be read)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def supported_isas() -> list[str]:
    """Names of the kernel builds this CPU can run, best first."""
    features = cpu_features()
    return [spec.name for spec in ISAS if all(f in features for f in spec.required)]


def default_isa() -> str | None:
    """``PAGELLM_CPU_ISA`` if set (and supported), else the best build this CPU runs."""
    supported = supported_isas()
    wanted = os.environ.get("PAGELLM_CPU_ISA")
    if wanted:
        if wanted not in supported:
            raise ValueError(
                f"PAGELLM_CPU_ISA={wanted!r} is not supported on this CPU; supported: "
                + (", ".join(supported) or "none")
            )
        return wanted
    return supported[0] if supported else None


def _sources() -> list[tuple[str, bytes]]:
    root = resources.files("pagellm").joinpath("csrc")
    return sorted(
        (entry.name, entry.read_bytes())
        for entry in root.iterdir()
        if entry.name.endswith((".c", ".h"))
    )


def _compile(src_dir: str, c_files: list[str], flags: list[str], out: str, cc: str) -> None:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    try:
        subprocess.run(
            [
                cc,
                *flags,
                "-I",
                src_dir,
                *(os.path.join(src_dir, c) for c in c_files),
                "-o",
                tmp,
                "-lm",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        os.replace(tmp, out)  # atomic: concurrent builders never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(isa: str | None = None) -> ctypes.CDLL | None:
    """The kernel library for ``isa`` (default: ``default_isa()``), or None where it
    cannot be built here (the reason is logged)."""
    if os.environ.get("PAGELLM_NATIVE", "1") == "0":
        _log_once("native CPU kernels disabled by PAGELLM_NATIVE=0; using torch ops")
        return None
    name = isa or default_isa()
    if name is None:
        _log_once("native CPU kernels need x86-64 Linux with AVX2, FMA and F16C; using torch ops")
        return None
    if name not in supported_isas():
        raise ValueError(f"this CPU cannot run the {name!r} kernels; supported: {supported_isas()}")
    return _load(name)


def loaded() -> bool:
    """Whether this process has loaded any kernel build (benchmarks check that their
    transformers baseline runs in a process without them)."""
    return _load.cache_info().currsize > 0


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


@functools.cache
def _load(name: str) -> ctypes.CDLL | None:
    spec = next(s for s in ISAS if s.name == name)
    features = cpu_features()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found; pagellm uses torch ops on CPU (slower)")
        return None
    flags = spec.compile_flags(features)
    sources = _sources()
    digest = hashlib.sha256()
    for fname, data in sources:
        digest.update(fname.encode() + b"\0" + data)
    digest.update(" ".join([compiler, *flags, *sorted(features)]).encode())
    out_path = os.path.join(
        cache_dir("kernels", f"{name}-{digest.hexdigest()[:16]}"), "libpagellm_cpu.so"
    )
    if not os.path.exists(out_path):
        with tempfile.TemporaryDirectory() as src_dir:
            for fname, data in sources:
                with open(os.path.join(src_dir, fname), "wb") as f:
                    f.write(data)
            c_files = [fname for fname, _ in sources if fname.endswith(".c")]
            try:
                _compile(src_dir, c_files, flags, out_path, compiler)
            except (subprocess.SubprocessError, OSError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                logger.warning(
                    "building the %s CPU kernels failed; using torch ops: %s", name, detail
                )
                return None
        logger.info("built %s CPU kernels (%s) into %s", name, " ".join(flags), out_path)
    lib = ctypes.CDLL(out_path)
    for fn_name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, fn_name)
        fn.argtypes = argtypes
        fn.restype = restype
    built_for = lib.pagellm_isa().decode()
    assert built_for == name, (built_for, name)
    if lib.pagellm_has_bf16_dot():
        lib.pagellm_set_bf16_dot(int(_bf16_dot_pays(lib)))
    return lib


def _bf16_dot_pays(lib: ctypes.CDLL) -> bool:
    """Whether bf16 weights should run on vdpbf16ps rather than be widened to float32:
    ``PAGELLM_BF16_DOT=1`` / ``0`` say so, else (``auto``) one thread's measured rate of
    each decides (about 5 ms). The instruction is twice the FMA rate on AMD Zen 4 but half
    of it on some Intel Xeons (measured: 163 vs 334 GFLOP/s on 2 cores)."""
    wanted = os.environ.get("PAGELLM_BF16_DOT", "auto")
    if wanted not in ("auto", "0", "1"):
        raise ValueError(f"PAGELLM_BF16_DOT must be auto, 0 or 1, not {wanted!r}")
    if wanted != "auto":
        return wanted == "1"
    # pagellm_peak_ops kinds 0 and 2: float32 FMA and bf16 dot, in FLOPs either way
    rates = {kind: peak_rate(lib, kind, 1 << 17, 1, 3) for kind in (0, 2)}
    pays = rates[2] > rates[0]
    logger.info(
        "bf16 weights: %s (vdpbf16ps %.0f vs float32 FMA %.0f GFLOP/s, one thread)",
        "vdpbf16ps" if pays else "widened to float32",
        rates[2] / 1e9,
        rates[0] / 1e9,
    )
    return pays


def peak_rate(lib: ctypes.CDLL, kind: int, iters: int, threads: int, repeats: int) -> float:
    """Operations per second of ``pagellm_peak_ops(kind, iters, threads)``, the best of
    ``repeats`` timed calls after one untimed call (caches and clock settle)."""
    ops = lib.pagellm_peak_ops(kind, iters, threads)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        lib.pagellm_peak_ops(kind, iters, threads)
        best = min(best, time.perf_counter() - start)
    return float(ops / best)
