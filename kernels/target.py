"""What numba compiles for: the architecture and the CPU features of its target, read once at import.

The hand-written LLVM IR (kernels/intdot.py, rowdot.py, gather.py, llvm_ir.py, sync.py) and the choice
of kernels (kernels/dequant.py, kv.py, matvec.py, sparse_ffn.py, decode_token.py) ask this module and
nothing else: an instruction the target lacks crashes the process or fails to compile, and one it has
but the code skips costs speed. It mirrors numba's own choice (numba/core/codegen.py): the architecture
of the process's LLVM triple, and the features in NUMBA_CPU_FEATURES when that is set (NUMBA_CPU_NAME=
generic sets it to none), else the host's as numba reads them from llvmlite (NUMBA_ENABLE_AVX=0 turns
the avx* ones off). A feature implied only by NUMBA_CPU_NAME and not listed counts as absent: the
portable code is then chosen, which runs everywhere.

  ARCH         "x86_64", "aarch64" or "other"
  NATIVE_HALF  halves convert to and from float32 in one instruction: x86 with F16C (every AVX2 CPU),
               and AArch64, where fcvt is baseline ARMv8. Elsewhere LLVM lowers a half fpext/fptrunc
               to a runtime-helper call (__extendhfsf2) that numba's JIT does not resolve, and the
               process crashes: kernels/llvm_ir.half_to_f32 converts with integer arithmetic there.
  AVX2         x86 AVX2: pmaddubsw + pmaddwd integer dot products (kernels/rowdot.py)
  VNNI512      x86 AVX-512 F, BW and VNNI: vpdpbusd over 64 bytes
  VBMI         x86 AVX-512 VBMI: vpermb, vpermt2b and vpmultishiftqb, the S4 rows' gather of the x values
               a block keeps (kernels/rowdot24.py)
  VBMI2        x86 AVX-512 VBMI2: vpexpandb, the 2:4 layouts' expansion in registers (kernels/rowdot24.py)
  DOTPROD      AArch64's dot-product extension (sdot/udot). Known for completeness: no kernel has an
               sdot path yet, so AArch64 runs the generic vector IR, which LLVM lowers to NEON.

Without numba nothing is compiled: ARCH is "other" and every feature False.
"""

from kernels.backend import NUMBA

ARCH = "other"
FEATURES: frozenset = frozenset()    # the enabled LLVM feature names ("avx2", "f16c", "dotprod", ...)
NATIVE_HALF = AVX2 = VNNI512 = VBMI = VBMI2 = DOTPROD = False


def arch_of(triple: str) -> str:
    """"x86_64", "aarch64" or "other" for an LLVM target triple ("x86_64-unknown-linux-gnu", "arm64-apple-
    darwin23.0.0", ...). 32-bit x86 counts as other: numba ships no builds for it."""
    machine = triple.split("-")[0].lower()
    if machine in ("x86_64", "amd64"):
        return "x86_64"
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    return "other"


def features_of(spec: str) -> frozenset:
    """The enabled names of an LLVM feature string: "+avx2,-avx512f,+f16c" -> {"avx2", "f16c"}."""
    return frozenset(f.strip()[1:] for f in spec.split(",") if f.strip().startswith("+"))


if NUMBA:
    import llvmlite.binding as _ll
    from numba.core import codegen as _codegen, config as _config

    ARCH = arch_of(_ll.get_process_triple())
    FEATURES = features_of(_config.CPU_FEATURES if _config.CPU_FEATURES is not None
                           else _codegen.get_host_cpu_features())
    _x86 = ARCH == "x86_64"
    AVX2 = _x86 and "avx2" in FEATURES
    VNNI512 = _x86 and {"avx512f", "avx512bw", "avx512vnni"} <= FEATURES
    VBMI = _x86 and {"avx512f", "avx512bw", "avx512vbmi"} <= FEATURES
    VBMI2 = _x86 and {"avx512f", "avx512bw", "avx512vbmi2"} <= FEATURES
    NATIVE_HALF = ARCH == "aarch64" or (_x86 and "f16c" in FEATURES)
    DOTPROD = ARCH == "aarch64" and "dotprod" in FEATURES
