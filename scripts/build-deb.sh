#!/bin/sh
# Build the Debian package: build/harmonicd_<version>_<arch>.deb (`make deb`).
#
#   sh scripts/build-deb.sh [--version V] [--out DIR]
#
# The version is harmonicd/__init__.py's __version__; debian/changelog must say
# the same (one clear line and exit 1 if not). --version V builds the same tree
# as version V instead (the upgrade test installs an older build first).
#
# Steps:
#   1. wheels: the pinned dependencies (requirements.lock) and the build backend
#      into build/wheels, once (later builds use them without the network);
#   2. a copy of what the package is made from (harmonicd/, debian/, systemd/,
#      docs/, ...) in build/deb/, so the build never writes into the checkout;
#   3. dpkg-buildpackage -b in that copy (debian/rules installs from build/wheels).
# Needs: dpkg-dev, debhelper, python3-venv, python3-pip (make deb installs them).
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build"
override=""
while [ $# -gt 0 ]; do
    case "$1" in
        --version) override="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "usage: $0 [--version V] [--out DIR]" >&2; exit 2 ;;
    esac
done

for tool in dpkg-buildpackage dh /usr/bin/python3; do
    command -v "$tool" >/dev/null || {
        echo "error: $tool is missing (Debian packages dpkg-dev debhelper python3-venv python3-pip; make deb installs them)" >&2
        exit 1
    }
done
/usr/bin/python3 -m pip --version >/dev/null 2>&1 || {
    echo "error: /usr/bin/python3 has no pip (Debian package python3-pip)" >&2; exit 1; }

version=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$root/harmonicd/__init__.py")
[ -n "$version" ] || { echo "error: harmonicd/__init__.py: no __version__ = \"...\" line" >&2; exit 1; }
logged=$(dpkg-parsechangelog -l "$root/debian/changelog" -S Version)
if [ "$version" != "$logged" ]; then
    echo "error: harmonicd/__init__.py says $version but debian/changelog says $logged: add an entry (dch -v $version)" >&2
    exit 1
fi
[ -n "$override" ] && version="$override"

mkdir -p "$out"
out=$(cd "$out" && pwd)
wheels="$root/build/wheels"
mkdir -p "$wheels"

# 1. Wheels. The build backend: pyproject.toml's [build-system] (pip builds
#    harmonicd's own wheel in isolation, from this folder too).
backend=$(sed -n 's/^requires = \["\([^"]*\)"\]$/\1/p' "$root/pyproject.toml")
fetch() {
    /usr/bin/python3 -m pip download --quiet --disable-pip-version-check --no-input \
        --only-binary=:all: --dest "$wheels" "$@" -r "$root/requirements.lock" "$backend"
}
# Offline first: a second build (and every test run after the first) needs no network.
fetch --no-index --find-links "$wheels" >/dev/null 2>&1 || fetch

# 2. The source copy.
work="$root/build/deb"
src="$work/harmonicd-$version"
rm -rf "$src" "$work"/harmonicd_"$version"_*
mkdir -p "$src"
tar -C "$root" -cf - --exclude=__pycache__ \
    harmonicd debian systemd docs pyproject.toml README.md requirements.lock | tar -C "$src" -xf -
if [ -n "$override" ]; then
    sed -i "s/^__version__ = .*/__version__ = \"$override\"/" "$src/harmonicd/__init__.py"
    cat > "$src/debian/changelog" <<EOF
harmonicd ($override) bookworm; urgency=medium

  * Build of $logged's tree as version $override (scripts/build-deb.sh --version).

 -- $(dpkg-parsechangelog -l "$root/debian/changelog" -S Maintainer)  $(date -R)
EOF
fi

# 3. Build (binary only, unsigned).
(cd "$src" && HARMONIC_WHEELS="$wheels" dpkg-buildpackage -b -us -uc) > "$work/build-$version.log" 2>&1 || {
    tail -n 30 "$work/build-$version.log" >&2
    echo "error: dpkg-buildpackage failed; the whole log: $work/build-$version.log" >&2
    exit 1
}
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
deb="harmonicd_${version}_${arch}.deb"
mv "$work/$deb" "$out/$deb"
rm -rf "$src" "$work"/harmonicd_"$version"_*.buildinfo "$work"/harmonicd_"$version"_*.changes
echo "$out/$deb"
