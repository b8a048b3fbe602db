#!/bin/bash
# Runs inside the booted container (see tests/systemd/run.sh); prints ok:/FAILED:/info: lines and
# SYSTEMD_CHECK_EXIT, then powers the container off. Every journal query reads this boot only (-b), and
# after a cursor taken just before the step it checks, so nothing from an earlier boot or step can pass
# a check.
set -Eeuo pipefail
. /opt/whaled-test/expected.env   # deb_version, deb_sha, container_host

finished=
finish() {
    finished=yes
    echo "SYSTEMD_CHECK_EXIT=$1"
    systemctl poweroff --no-block
    exit 0
}
fail() {
    echo "FAILED: $*"
    journalctl -b -u whaled --no-pager -n 40 || true
    finish 1
}
ok() { echo "ok: $*"; }
# Anything that fails outside a check still ends the test (and the container) at once.
trap 'echo "FAILED: check.sh line $LINENO: $BASH_COMMAND"' ERR
trap '[ -n "$finished" ] || { echo "SYSTEMD_CHECK_EXIT=1"; systemctl poweroff --no-block; }' EXIT

# The journal's position now: later queries read only what comes after it.
cursor() { journalctl -b -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'; }
# whaled's journal (its log lines, its stdout, and systemd's messages about the unit) in this boot
# after cursor $1, as plain messages.
journal_after() { journalctl -b -u whaled --after-cursor="$1" -o cat --no-pager; }
main_pid() { systemctl show -p MainPID --value whaled; }
restarts() { systemctl show -p NRestarts --value whaled; }
# Waits up to $2 s for a line matching the extended regex $3 in whaled's journal after cursor $1.
wait_for() {
    local i
    for i in $(seq "$2"); do
        journal_after "$1" | grep -E "$3" >/dev/null && return 0
        sleep 1
    done
    return 1
}

dpkg -i /opt/whaled-test/whaled.deb > /tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; fail "dpkg -i"; }
installed=$(dpkg-query -W -f '${Version}' whaled)
[ "$installed" = "$deb_version" ] || fail "installed whaled $installed, expected $deb_version"
sha=$(sha256sum /usr/bin/whaled | cut -d' ' -f1)
[ "$sha" = "$deb_sha" ] || fail "/usr/bin/whaled (sha256 $sha) is not the binary of the package just built ($deb_sha)"
ok "dpkg -i whaled.deb: version $installed, /usr/bin/whaled is the binary just built"
getent passwd whaled >/dev/null || fail "no whaled system user"
id -nG whaled | grep -w video >/dev/null || fail "whaled is not in the video group"
ok "system user whaled (groups: $(id -nG whaled))"
test -f /etc/whaled/whaled.toml && test -f /usr/share/whaled/models/efficientnet-lite0/model.toml || fail "config or models missing"
/usr/bin/whaled check-config /etc/whaled/whaled.toml >/dev/null 2>&1 || fail "shipped config does not validate"
ok "shipped config validates against the shipped models"

# A replay camera (looping) instead of a real one; a short stall timeout and watchdog for the test.
# No device_id: the default (the host name) is under test.
write_config() {
    cat > /etc/whaled/whaled.toml <<TOML
[[camera]]
name = "$1"
kind = "replay"
path = "/opt/whaled-test/photos"
fps = 5
[pipeline]
emit_rejected = true
stall_timeout = "3s"
TOML
}
write_config bow
mkdir -p /etc/systemd/system/whaled.service.d
printf '[Service]\nWatchdogSec=8s\nRestartSec=1s\n' > /etc/systemd/system/whaled.service.d/test.conf
systemctl daemon-reload

c_start=$(cursor)
start=$(date +%s)
systemctl enable --now whaled 2>/dev/null || fail "systemctl enable --now whaled"
# Type=notify: enable --now returns once READY=1 arrived.
[ "$(systemctl is-active whaled)" = active ] || fail "not active after start"
ok "active after READY=1 ($(( $(date +%s) - start )) s)"
sleep 3
status=$(systemctl show -p StatusText --value whaled)
case "$status" in
    *"camera(s)"*) ok "STATUS= \"$status\"" ;;
    *) fail "unexpected STATUS= \"$status\"" ;;
esac
pid=$(main_pid)
user=$(stat -c %U "/proc/$pid")
[ "$user" = whaled ] || fail "runs as $user"
ok "runs as user whaled"

# One identity per box: the daemon, under the hardened unit (ProcSubset=pid hides
# /proc/sys/kernel/hostname), names itself after the container's host name.
[ "$(uname -n)" = "$container_host" ] || fail "the container's host name is $(uname -n), expected $container_host"
wait_for "$c_start" 30 '"camera":"bow"' || fail "no detection from camera bow within 30 s"
ids=$(journal_after "$c_start" | { grep -o '"device_id":"[^"]*"' || true; } | sort -u | tr '\n' ' ')
[ "$ids" = "\"device_id\":\"$container_host\" " ] || fail "detections carry ${ids:-no device_id}, expected \"$container_host\" (the host name)"
ok "detections carry device_id \"$container_host\", the container's host name"
# What the old default read, as the unit sees it (info only: shows what the check above guards against).
hidden=$(systemd-run --quiet --wait --pipe -p ProcSubset=pid cat /proc/sys/kernel/hostname 2>&1 || true)
echo "info: /proc/sys/kernel/hostname under ProcSubset=pid: ${hidden:-<empty>}"

# Reload: a changed config (camera renamed) must be in force afterwards, in the same process.
restarts_before=$(restarts)
write_config stern
c_reload=$(cursor)
systemctl reload whaled || fail "systemctl reload whaled"
wait_for "$c_reload" 30 '"camera":"stern"' || fail "reload: no detection from the renamed camera within 30 s"
after=$(journal_after "$c_reload")
grep -q "restarting .* with the new configuration" <<<"$after" || fail "reload: no \"restarting ... with the new configuration\" line"
[ "$(main_pid)" = "$pid" ] || fail "reload changed the PID ($pid -> $(main_pid))"
[ "$(restarts)" = "$restarts_before" ] || fail "reload counted as a restart (NRestarts $restarts_before -> $(restarts))"
[ "$(systemctl is-active whaled)" = active ] || fail "not active after reload"
# Detections printed after the re-exec come from the new camera only.
last=$(grep '"camera":' <<<"$after" | tail -1)
grep -q '"camera":"stern"' <<<"$last" || fail "reload: detections still come from the old camera: $last"
ok "systemctl reload: new config in force (camera stern), same PID $pid, NRestarts $restarts_before"

# The hang: inference stops after 10 frames; only the watchdog can notice.
printf '[Service]\nWatchdogSec=8s\nRestartSec=1s\nEnvironment=WHALED_TEST_HANG_AFTER_FRAMES=10\n' > /etc/systemd/system/whaled.service.d/test.conf
systemctl daemon-reload
c_hang=$(cursor)
systemctl restart whaled
restarts_before=$(restarts)
i=0
while [ "$(restarts)" = "$restarts_before" ]; do
    i=$((i + 1)); [ $i -gt 90 ] && fail "no watchdog restart within 90 s"
    sleep 1
done
after=$(journal_after "$c_hang")
grep -q "Watchdog timeout" <<<"$after" || fail "restart was not caused by the watchdog"
grep -q "pipeline stalled" <<<"$after" || fail "whaled did not report the stall"
ok "hung inference: watchdog timeout, killed and restarted by systemd after ${i} s (NRestarts $restarts_before -> $(restarts))"
grep -E "Watchdog timeout|pipeline stalled" <<<"$after" | sed -n '1,3s/^/info: /p'
systemctl stop whaled
finish 0
