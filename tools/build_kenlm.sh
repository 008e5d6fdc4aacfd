#!/usr/bin/env bash
# Build KenLM's `lmplz` (n-gram estimation) and `build_binary` (ARPA -> binary) from the source of
# the pinned `kenlm` Python package, into a cache folder that megallama finds on its own:
#   ${MEGALLAMA_KENLM_DIR:-$HOME/.cache/megallama/kenlm-$KENLM_VERSION}/bin/{lmplz,build_binary}
# Boost (program_options, system, thread; test, which its CMakeLists asks for) comes from the system packages: installed with apt-get
# when missing and this runs as root; otherwise the script says which packages to install.
# Only the two targets are built (about 3 minutes on 2 cores); a finished build is reused.
set -euo pipefail

KENLM_VERSION="${KENLM_VERSION:-0.3.0}"
PYTHON="${PYTHON:-python3}"
DEST="${MEGALLAMA_KENLM_DIR:-$HOME/.cache/megallama/kenlm-$KENLM_VERSION}"
BOOST_PACKAGES="libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev"

if [ -x "$DEST/bin/lmplz" ] && [ -x "$DEST/bin/build_binary" ]; then
    echo "kenlm: lmplz and build_binary already built in $DEST/bin"
    exit 0
fi

if ! dpkg -s $BOOST_PACKAGES >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "kenlm: installing Boost from the system packages ($BOOST_PACKAGES)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $BOOST_PACKAGES
    elif ! command -v dpkg >/dev/null; then
        echo "kenlm: no dpkg here; if the build fails, install Boost (program_options system thread test)" >&2
    else
        echo "kenlm: lmplz needs Boost; install it first: sudo apt-get install $BOOST_PACKAGES" >&2
        exit 1
    fi
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: \
    "kenlm==$KENLM_VERSION" -d "$WORK"
tar xzf "$WORK/kenlm-$KENLM_VERSION.tar.gz" -C "$WORK"
cmake -S "$WORK/kenlm-$KENLM_VERSION" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release >"$WORK/cmake.log" \
    || { cat "$WORK/cmake.log" >&2; exit 1; }
cmake --build "$WORK/build" --target lmplz build_binary -j "$(nproc)"
mkdir -p "$DEST/bin"
# copy then rename, so an interrupted build never leaves a half-written binary that looks done
for tool in lmplz build_binary; do
    cp "$WORK/build/bin/$tool" "$DEST/bin/.$tool.tmp"
    mv "$DEST/bin/.$tool.tmp" "$DEST/bin/$tool"
done
echo "kenlm: built $DEST/bin/lmplz and $DEST/bin/build_binary"
