#!/bin/sh
# Runs inside the booted container (see tests/systemd/run.sh); prints ok:/FAILED: lines and
# SYSTEMD_CHECK_EXIT, then powers the container off.
finish() { echo "SYSTEMD_CHECK_EXIT=$1"; systemctl poweroff --no-block; exit 0; }
fail() { echo "FAILED: $*"; journalctl -u whaled --no-pager -n 40; finish 1; }
ok() { echo "ok: $*"; }

dpkg -i /opt/whaled-test/whaled.deb > /tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; fail "dpkg -i"; }
ok "dpkg -i whaled.deb"
getent passwd whaled >/dev/null || fail "no whaled system user"
id -nG whaled | grep -qw video || fail "whaled is not in the video group"
ok "system user whaled (groups: $(id -nG whaled))"
test -f /etc/whaled/whaled.toml && test -f /usr/share/whaled/models/efficientnet-lite0/model.toml || fail "config or models missing"
/usr/bin/whaled check-config /etc/whaled/whaled.toml >/dev/null 2>&1 || fail "shipped config does not validate"
ok "shipped config validates against the shipped models"

# A replay camera instead of a real one; a short stall timeout and watchdog for the test.
cat > /etc/whaled/whaled.toml <<TOML
[[camera]]
name = "bow"
kind = "replay"
path = "/opt/whaled-test/photos"
fps = 5
[pipeline]
emit_rejected = true
stall_timeout = "3s"
TOML
mkdir -p /etc/systemd/system/whaled.service.d
printf '[Service]\nWatchdogSec=8s\nRestartSec=1s\n' > /etc/systemd/system/whaled.service.d/test.conf
systemctl daemon-reload

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
user=$(stat -c %U "/proc/$(systemctl show -p MainPID --value whaled)")
[ "$user" = whaled ] || fail "runs as $user"
ok "runs as user whaled"
journalctl -u whaled --no-pager | grep -q '"camera":"bow"' && ok "detections in the journal" || echo "info: no detection line yet"
pid_before=$(systemctl show -p MainPID --value whaled)
systemctl reload whaled
sleep 4
[ "$(systemctl show -p MainPID --value whaled)" = "$pid_before" ] && [ "$(systemctl is-active whaled)" = active ] || fail "reload (SIGHUP re-exec) changed the PID or stopped the service"
ok "systemctl reload: same PID, still active"

# The hang: inference stops after 10 frames; only the watchdog can notice.
printf '[Service]\nWatchdogSec=8s\nRestartSec=1s\nEnvironment=WHALED_TEST_HANG_AFTER_FRAMES=10\n' > /etc/systemd/system/whaled.service.d/test.conf
systemctl daemon-reload
systemctl restart whaled
restarts=$(systemctl show -p NRestarts --value whaled)
i=0
while [ "$(systemctl show -p NRestarts --value whaled)" = "$restarts" ]; do
    i=$((i + 1)); [ $i -gt 90 ] && fail "no watchdog restart within 90 s"
    sleep 1
done
journalctl -u whaled --no-pager | grep -q "Watchdog timeout" || fail "restart was not caused by the watchdog"
journalctl -u whaled --no-pager | grep -q "pipeline stalled" || fail "whaled did not report the stall"
ok "hung inference: watchdog timeout, killed and restarted by systemd after ${i} s (NRestarts $restarts -> $(systemctl show -p NRestarts --value whaled))"
journalctl -u whaled --no-pager | grep -E "Watchdog timeout|pipeline stalled" | head -3 | sed 's/^/info: /'
systemctl stop whaled
finish 0
