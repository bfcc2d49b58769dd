#!/usr/bin/env bash
# tools/test_arm64.sh: run pocketinfer's kernel tests on ARM64 (aarch64), emulated on an x86-64 Debian host.
#
#   tools/test_arm64.sh [--setup-only] [--worktree] [REPO_DIR] [-- PYTEST_ARGS...]
#
# What: builds (once) an arm64 Debian userland holding Python 3.11 and an aarch64 site-packages
# (numpy, numba, llvmlite, pytest, hypothesis from PyPI's aarch64 wheels), then runs pytest in that
# Python under qemu-user on a snapshot of REPO_DIR's HEAD (git archive; --worktree: the directory as
# it is, uncommitted changes included). Without PYTEST_ARGS naming tests it runs the kernel tests:
# tests/test_kernels.py, test_kv.py, test_sparse_ffn.py, test_rowdot_sync.py and test_gemm.py. PYTEST_ARGS are
# passed on (e.g. -- -x -k q4); paths in them are relative to the repository. Default files that a
# checkout lacks are left out with a note.
#
# Why emulation: pocketinfer's target is ARM64 phones, and its numba kernels build LLVM IR by hand
# (kernels/intdot.py, rowdot.py, gather.py, sync.py, kv.py, dequant.py) with per-architecture choices
# (x86 intrinsics, half-precision conversion, prefetches, spin-wait hints). Only an aarch64 Python
# makes numba JIT for aarch64 and take the code paths a phone takes; qemu-user runs that Python here.
#
# How:
#   - host tools: qemu-user-static and debootstrap from Debian (installed by apt-get if missing);
#   - rootfs: `debootstrap --foreign` resolves, downloads (signature-checked) and lists bookworm's
#     arm64 packages for python3.11; every downloaded .deb is then unpacked with `dpkg -x`.
#     debootstrap's second stage (and so a chroot) is not used: it runs arm64 maintainer scripts,
#     which needs binfmt_misc, and the tests need files only. This keeps the host's dpkg
#     architectures and apt lists untouched (no `dpkg --add-architecture arm64`). The Debian mirror
#     is read from the host's apt configuration at run time;
#   - Python runs as `qemu-aarch64-static ROOTFS/usr/bin/python3.11` with QEMU_LD_PREFIX=ROOTFS, so no
#     binfmt_misc is needed. If binfmt_misc is available (as root the script mounts it and registers
#     Debian's qemu-aarch64 handler, system-wide, for aarch64 ELF files only; ARM64_BINFMT=no skips
#     that), tests that start `sys.executable` in a subprocess work too; without it they are
#     deselected, and the run says so;
#   - wheels: `pip download --platform manylinux..._aarch64 --only-binary=:all:` on the host, then
#     `pip install --target` into an aarch64 site directory put on PYTHONPATH;
#   - numba's cache: POCKETINFER_HOME is a fresh directory per run, so every run compiles cold and
#     never meets x86 cache files.
#
# Time: setup ~1 min the first time (about 60 MB of .debs, 80 MB of wheels), seconds afterwards
# (re-runs reuse the rootfs, wheels and site directory). The default tests took 43 min of wall time
# on a 2-core x86-64 machine (6.3 min natively there: ~7x), nearly all of it numba compiling kernels
# under emulation; test_sparse_ffn alone is ~25 min. Use PYTEST_ARGS (-k, test ids) for less.
# Needs: root (apt-get, debootstrap), network access to the Debian archive and PyPI, ~650 MB disk,
# git (for the snapshot) and a host python3 with pip. The test extras torch and transformers are not
# installed: PyPI's aarch64 torch wheel is a CUDA build (427 MB plus several GB of nvidia wheels), so
# the tests that build a model with torch (test_rowdot_sync's one-region decode tests) skip.
#
# Environment: POCKETINFER_ARM64_DIR (work directory; default ~/.cache/pocketinfer/arm64), ARM64_NUMBA (pip
# requirement; default numba==0.68.*), ARM64_LLVMLITE (default llvmlite==0.50.*), ARM64_TIMEOUT
# (seconds for the test run; default 7200), ARM64_BINFMT=no, DEBIAN_MIRROR (overrides the host's apt
# configuration). NUMBA_CPU_NAME / NUMBA_CPU_FEATURES are passed to the emulated Python, e.g.
# NUMBA_CPU_FEATURES=+neon,+fp-armv8,+dotprod (qemu's default CPU executes ARMv8.2+ instructions).

set -euo pipefail

PROG=$(basename "$0")
die() { echo "$PROG: error: $*" >&2; exit 2; }
say() { echo "$PROG: $*" >&2; }

WORK=${POCKETINFER_ARM64_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pocketinfer/arm64}
SUITE=bookworm          # Debian 12: python3.11, the Python the wheels below are fetched for
PY=3.11
NUMBA_REQ=${ARM64_NUMBA:-numba==0.68.*}
LLVMLITE_REQ=${ARM64_LLVMLITE:-llvmlite==0.50.*}
REQS=("$NUMBA_REQ" "$LLVMLITE_REQ" numpy pytest hypothesis)
# arm64 packages unpacked into the rootfs on top of debootstrap's minimal base (libgomp1: numba's
# OpenMP threading layer, as a phone's Linux userland would have it)
DEBS=python3.11-minimal,libpython3.11-stdlib,libstdc++6,libgomp1,zlib1g
DEFAULT_TESTS=(tests/test_kernels.py tests/test_kv.py tests/test_sparse_ffn.py tests/test_rowdot_sync.py tests/test_gemm.py)
# Tests that run sys.executable in a subprocess: they need binfmt_misc (the child is an aarch64 ELF).
SUBPROCESS_TESTS=(tests/test_kernels.py::test_numpy_only_mode tests/test_sparse_ffn.py::test_numpy_only_mode)

ROOTFS=$WORK/rootfs
WHEELS=$WORK/wheels
SITE=$WORK/site
SETUP_ONLY=0
WORKTREE=0
REPO=
PYTEST_ARGS=()

while (($#)); do
    case $1 in
        --setup-only) SETUP_ONLY=1 ;;
        --worktree) WORKTREE=1 ;;
        -h|--help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $REPO ]] || die "one REPO_DIR only (got $REPO and $1)"; REPO=$1 ;;
    esac
    shift
done

[[ $(uname -m) == x86_64 ]] || die "this emulates aarch64 on an x86-64 host; on $(uname -m) run pytest natively"
[[ $EUID -eq 0 ]] || die "needs root (apt-get, debootstrap); run it with sudo"

if [[ -z $REPO ]]; then        # the checkout this script belongs to (tools/..), else the current directory
    REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || true)
    [[ -n $REPO && -d $REPO/kernels ]] || REPO=$PWD
fi
[[ -d $REPO ]] || die "no such directory: $REPO"
REPO=$(cd "$REPO" && pwd)
[[ -d $REPO/kernels && -d $REPO/tests ]] || die "$REPO is not a pocketinfer checkout (no kernels/ and tests/)"

mkdir -p "$WORK"
T0=$SECONDS

# ---------------------------------------------------------------- host tools

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    say "installing qemu-user-static and debootstrap (apt-get)"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap >/dev/null \
        || die "apt-get install qemu-user-static debootstrap failed"
fi
QEMU=$(command -v qemu-aarch64-static)
python3 -m pip --version >/dev/null 2>&1 || die "the host needs python3 with pip (to fetch the aarch64 wheels)"

# The Debian archive's URI as the host's apt uses it: the first deb822 stanza (or one-line entry) of
# a plain suite (not -security / -updates), so that a mirror or snapshot configured here is used.
debian_mirror() {
    local f=/etc/apt/sources.list.d/debian.sources uri=
    if [[ -r $f ]]; then
        uri=$(awk '
            /^[[:space:]]*$/ { if (u != "" && plain) { print u; exit } u = ""; plain = 0; next }
            tolower($1) == "uris:" { u = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i !~ /-/) plain = 1 }
            END { if (u != "" && plain) print u }' "$f" | head -n1)
    fi
    if [[ -z $uri && -r /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++;
                                 if ($(i + 1) !~ /-/) { print $i; exit } }' /etc/apt/sources.list)
    fi
    echo "$uri"
}

# ---------------------------------------------------------------- arm64 rootfs

if [[ ! -f $ROOTFS/.pocketinfer-rootfs || $(cat "$ROOTFS/.pocketinfer-rootfs") != "$SUITE $DEBS" ]]; then
    MIRROR=${DEBIAN_MIRROR:-$(debian_mirror)}
    [[ $MIRROR == http://* || $MIRROR == https://* || $MIRROR == file:/* ]] \
        || die "no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list (set DEBIAN_MIRROR)"
    KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -r $KEYRING ]] || die "missing $KEYRING (apt-get install debian-archive-keyring)"
    say "building the arm64 rootfs ($SUITE, $DEBS) from $MIRROR"
    rm -rf "$ROOTFS.tmp"
    nice -n 10 debootstrap --arch=arm64 --foreign --variant=minbase --keyring="$KEYRING" --include="$DEBS" \
        "$SUITE" "$ROOTFS.tmp" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || die "debootstrap failed (see $WORK/debootstrap.log)"
    shopt -s nullglob
    debs=("$ROOTFS.tmp"/var/cache/apt/archives/*.deb)
    shopt -u nullglob
    ((${#debs[@]})) || die "debootstrap downloaded no packages (see $WORK/debootstrap.log)"
    for deb in "${debs[@]}"; do
        dpkg-deb -x "$deb" "$ROOTFS.tmp" || die "cannot unpack $deb"
    done
    rm -f "${debs[@]}"
    [[ -x $ROOTFS.tmp/usr/bin/python$PY ]] || die "the rootfs has no usr/bin/python$PY"
    QEMU_LD_PREFIX=$ROOTFS.tmp "$QEMU" "$ROOTFS.tmp/usr/bin/python$PY" -c 'import ctypes, zlib, ssl, sqlite3' \
        || die "python$PY does not start under $QEMU"
    rm -rf "$ROOTFS"
    mv "$ROOTFS.tmp" "$ROOTFS"
    echo "$SUITE $DEBS" >"$ROOTFS/.pocketinfer-rootfs"
fi
PYTHON=$ROOTFS/usr/bin/python$PY

# ---------------------------------------------------------------- aarch64 wheels

if [[ ! -f $SITE/.pocketinfer-site || $(cat "$SITE/.pocketinfer-site") != "${REQS[*]}" ]]; then
    say "fetching aarch64 wheels for Python $PY: ${REQS[*]}"
    PLAT=(--only-binary=:all: --python-version "$PY" --implementation cp --abi "cp${PY/./}"
          --platform manylinux_2_36_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
          --platform linux_aarch64)
    mkdir -p "$WHEELS"
    # (the grep: pip warns once per package about configured local indexes that lack it)
    nice -n 10 python3 -m pip download -q -d "$WHEELS" "${PLAT[@]}" "${REQS[@]}" \
        2> >(grep -v "^WARNING: Location 'file:" >&2) || die "pip download of the aarch64 wheels failed"
    rm -rf "$SITE.tmp"
    nice -n 10 python3 -m pip install -q --no-index --find-links "$WHEELS" --target "$SITE.tmp" "${PLAT[@]}" \
        "${REQS[@]}" 2> >(grep -v "^WARNING: Running pip as the 'root' user" >&2) \
        || die "pip install --target $SITE.tmp of the aarch64 wheels failed"
    rm -rf "$SITE"
    mv "$SITE.tmp" "$SITE"
    echo "${REQS[*]}" >"$SITE/.pocketinfer-site"
fi

# ---------------------------------------------------------------- the emulated environment

# The guest's environment: its own PYTHONPATH, a fresh numba cache, no x86 OpenBLAS core pinning
# (OPENBLAS_CORETYPE names x86 cores where it is set); NUMBA_CPU_* pass through.
HOME_DIR=$WORK/home
guest() {
    env -u PYTHONHOME -u NUMBA_CACHE_DIR -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        QEMU_LD_PREFIX="$ROOTFS" PYTHONPATH="$SITE" PYTHONDONTWRITEBYTECODE=1 PYTHONNOUSERSITE=1 \
        POCKETINFER_HOME="$HOME_DIR" "$@"
}

# binfmt_misc: lets the guest run aarch64 executables directly (subprocesses of sys.executable).
BINFMT=0
binfmt_works() { guest "$PYTHON" -c pass >/dev/null 2>&1; }
if binfmt_works; then
    BINFMT=1
elif [[ ${ARM64_BINFMT:-yes} != no ]]; then
    B=/proc/sys/fs/binfmt_misc
    [[ -e $B/register ]] || mount -t binfmt_misc binfmt_misc "$B" 2>/dev/null || true
    CONF=/usr/lib/binfmt.d/qemu-aarch64.conf
    if [[ -w $B/register && -r $CONF && ! -e $B/qemu-aarch64 ]]; then
        grep -v '^#' "$CONF" | head -n1 | tr -d '\n' >"$B/register" 2>/dev/null || true
    fi
    binfmt_works && BINFMT=1
fi

say "environment ($(( SECONDS - T0 )) s of setup):"
echo "  host: $(uname -m), $("$QEMU" --version | head -n1)"
echo "  binfmt_misc for aarch64: $([[ $BINFMT == 1 ]] && echo yes || echo 'no (subprocess tests deselected)')"
guest "$QEMU" "$PYTHON" - <<'EOF' || die "the aarch64 Python cannot import numba (see above)"
import platform, sys
import numpy, numba, llvmlite
import llvmlite.binding as llb
from numba.core import codegen, config
try:
    feats = llb.get_host_cpu_features().flatten()
except RuntimeError:
    feats = "(none reported)"
print(f"  guest: Python {platform.python_version()} on {platform.machine()}; numpy {numpy.__version__}, "
      f"numba {numba.__version__}, llvmlite {llvmlite.__version__} (LLVM {'.'.join(map(str, llb.llvm_version_info))})")
print(f"  LLVM host CPU: {llb.get_host_cpu_name()}; features: {feats or '(none)'}; "
      f"numba target: {config.CPU_NAME or 'host'} {config.CPU_FEATURES or codegen.get_host_cpu_features() or ''}")
EOF
((SETUP_ONLY)) && { say "setup done (--setup-only)"; exit 0; }

# ---------------------------------------------------------------- the tests

if ((WORKTREE)); then
    SRC=$REPO
    say "testing $REPO as it is (--worktree)"
else
    git -C "$REPO" rev-parse --verify -q HEAD >/dev/null || die "$REPO is not a git checkout with a commit (use --worktree)"
    SRC=$WORK/src
    rm -rf "$SRC"
    mkdir -p "$SRC"
    git -C "$REPO" archive HEAD | tar -x -C "$SRC" || die "git archive of $REPO failed"
    say "testing a snapshot of $REPO at $(git -C "$REPO" log -1 --format='%h %s' | cut -c1-80) in $SRC"
    [[ -z $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]] \
        || say "note: $REPO has uncommitted changes, which the snapshot leaves out (--worktree tests them)"
fi

# Default test files unless the arguments name a test path of their own.
named=0
for a in "${PYTEST_ARGS[@]}"; do
    [[ $a != -* && -e $SRC/${a%%::*} ]] && named=1
done
ARGS=("${PYTEST_ARGS[@]}")
if ((!named)); then
    for t in "${DEFAULT_TESTS[@]}"; do
        if [[ -e $SRC/$t ]]; then ARGS+=("$t"); else say "note: $t is not in this checkout; skipped"; fi
    done
fi
if ((!BINFMT)); then
    for t in "${SUBPROCESS_TESTS[@]}"; do
        ARGS+=(--deselect "$t")
    done
fi

rm -rf "$HOME_DIR"
mkdir -p "$HOME_DIR"
say "running pytest under qemu (timeout ${ARM64_TIMEOUT:-7200} s): ${ARGS[*]}"
T1=$SECONDS
set +e
(cd "$SRC" && guest nice -n 10 timeout "${ARM64_TIMEOUT:-7200}" "$QEMU" "$PYTHON" -m pytest -p no:cacheprovider \
    -rfEs --durations=15 "${ARGS[@]}")
rc=$?
set -e
((rc == 124)) && say "the test run timed out after ${ARM64_TIMEOUT:-7200} s"
say "pytest exit code $rc; tests took $(( SECONDS - T1 )) s, $(( SECONDS - T0 )) s in all"
exit "$rc"
