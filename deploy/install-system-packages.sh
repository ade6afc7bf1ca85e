#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real (nginx, systemd-analyze, mount,
# Chromium for the console's browser tests: Debian's package, never a browser download; Node.js and
# npm for the OpenAI JavaScript SDK's tests). Run by `make test`; does
# nothing when they are already there. Needs root (CI runs as root) or passwordless sudo.
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v mount >/dev/null 2>&1 || missing+=(mount)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)  # the official JavaScript SDK's tests (tests/js)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${1:-}" = "--bench" ]; then  # the benchmarks' fan-out baseline: nginx with nchan
    [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || missing+=(libnginx-mod-nchan)
fi
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
# the package starts a default site on port 80 where it can; the tests run their own nginx
$SUDO service nginx stop >/dev/null 2>&1 || true
