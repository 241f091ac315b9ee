#!/usr/bin/env bash
# Install modelpeer as a system service (idempotent), or remove it.
#
#   sudo systemd/install.sh                 # install from this checkout, then:
#   sudo systemctl enable --now modelpeer
#   sudo systemd/install.sh --uninstall     # remove it; the cache and the config stay
#
# With /etc/modelpeer/cluster.key present, the unit hands it to the service (LoadCredential=
# drop-in); without it the node is a local cache. Run it again after adding or removing the key.
#
# Options: --root DIR installs into DIR instead of / (for packaging and tests: no user is
# created and systemctl is not called); --source PATH installs another checkout.
# MODELPEER_INSTALL_PIP_ARGS adds pip arguments (e.g. a wheel directory).
set -euo pipefail

root="" source="" uninstall=0
while (($#)); do
  case $1 in
    --root) root=${2%/}; shift 2 ;;
    --source) source=$2; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")" && pwd)
source=${source:-$(dirname "$here")}

venv=$root/opt/modelpeer
unit=$root/etc/systemd/system/modelpeer.service
dropin=$unit.d/cluster-key.conf
confdir=$root/etc/modelpeer
key=$confdir/cluster.key
profile=$root/etc/profile.d/modelpeer.sh
envd=$root/usr/lib/environment.d/60-modelpeer.conf
live_system() { [[ -z $root ]] && [[ -d /run/systemd/system ]]; }

if ((uninstall)); then
  live_system && systemctl disable --now modelpeer.service 2>/dev/null || true
  rm -rf "$venv"
  rm -f "$unit" "$dropin" "$profile" "$envd" "$confdir/modelpeer.toml.example"
  rmdir "$unit.d" 2>/dev/null || true
  live_system && systemctl daemon-reload || true
  echo "modelpeer removed; kept the cache ($root/var/cache/modelpeer) and $confdir"
  exit 0
fi

if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC2086 # the extra pip arguments are words on purpose
"$venv/bin/pip" install -q --disable-pip-version-check ${MODELPEER_INSTALL_PIP_ARGS:-} "$source"
cp "$source/README.md" "$venv/README.md"

install -D -m 0644 "$here/modelpeer.service" "$unit"
install -D -m 0644 "$here/profile.d/modelpeer.sh" "$profile"
install -D -m 0644 "$here/environment.d/60-modelpeer.conf" "$envd"
install -d -m 0755 "$confdir"
if [[ -e $confdir/modelpeer.toml ]]; then
  # never overwrite a config someone may have edited; leave the new example beside it
  install -m 0644 "$here/modelpeer.toml" "$confdir/modelpeer.toml.example"
else
  install -m 0644 "$here/modelpeer.toml" "$confdir/modelpeer.toml"
fi

# systemd fails the unit if a LoadCredential= file is missing: the drop-in exists only with the key
if [[ -e $key ]]; then
  "$venv/bin/modelpeer" cluster-key check "$key" >/dev/null || {
    echo "install.sh: fix $key and run install.sh again" >&2; exit 1; }
  install -D -m 0644 "$here/cluster-key.conf" "$dropin"
  echo "cluster key $key: the unit hands it to modelpeerd (LoadCredential=, $dropin)"
else
  rm -f "$dropin"
  rmdir "$unit.d" 2>/dev/null || true
  echo "no cluster key at $key: a local cache only; to join a LAN, put the cluster's key there" \
       "(or make one: /opt/modelpeer/bin/modelpeer cluster-key new /etc/modelpeer/cluster.key)," \
       "then run install.sh again"
fi

if [[ -z $root ]]; then
  if ! id modelpeer >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/modelpeer --no-create-home \
            --shell /usr/sbin/nologin modelpeer
  fi
  live_system && systemctl daemon-reload
fi
echo "modelpeer installed in $venv; start it with: systemctl enable --now modelpeer" \
     "(if it runs already: systemctl restart modelpeer)"
