#!/bin/sh
# Install the Debian packages named on the command line when they are missing.
# As root: apt-get update once, then apt-get install. Otherwise: say what is
# missing and carry on (the tests that need them skip with that reason).
missing=""
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages:$missing"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
    echo "note: Debian packages missing (not root, not installed):$missing" >&2
fi
exit 0
