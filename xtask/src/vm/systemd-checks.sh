#!/bin/sh
# The systemd unit under a real systemd: `cargo xtask vm --systemd` boots the image
# with systemd-nspawn (its own network namespace) and runs this inside, as root.
# deploy/vagrant/provision.sh already installed deploy/systemd/interceptor.service,
# the selftest config (VIP 240.240.0.80:80 -> 127.0.0.1:18080) and its backend.
set -u
workspace=$(cat /payload/workspace-path)
failures=0
pass() { echo "systemd-check: PASS $*"; }
fail() { echo "systemd-check: FAIL $*"; failures=$((failures + 1)); }
get() { curl -fsS --max-time 5 "http://$1/index.html"; }
expected="hello from the selftest backend"

install -m 0755 "$workspace/target/debug/interceptor" /usr/local/bin/interceptor
# The tree's unit, not the one the cached image was provisioned with: the check is of
# this tree's capabilities and hardening.
install -m 0644 "$workspace/deploy/systemd/interceptor.service" /etc/systemd/system/interceptor.service
# The kernel module's debug log carries the verifier's log if a program is refused.
systemctl set-environment RUST_LOG=info,interceptor::kernel=debug
systemctl daemon-reload
systemctl start selftest-backend.service
for _ in $(seq 50); do curl -fsS -o /dev/null http://127.0.0.1:18080/ 2>/dev/null && break; sleep 0.2; done

# 1. start returns only once the daemon sent READY=1, which it sends after the
#    programs are attached and the proxy accepts: so the VIP answers at once, with
#    no retry, and the admin server reports ready.
if systemctl start interceptor.service; then
	if [ "$(get 240.240.0.80)" = "$expected" ]; then
		pass "start: active after READY=1, the VIP answered at once"
	else
		fail "start: active, but the VIP did not answer at once"
	fi
	interceptor ready --admin-addr 127.0.0.1:15000 >/dev/null &&
		pass "start: the admin server reports ready" ||
		fail "start: the admin server does not report ready"
else
	fail "start: systemctl start failed"
	journalctl -u interceptor.service --no-pager | tail -30
fi
# The Vagrant rig's self-test, installed by the same provision.sh.
interceptor-selftest >/dev/null && pass "start: interceptor-selftest (the Vagrant rig's check)" ||
	fail "start: interceptor-selftest failed"
[ "$(systemctl show -p Type --value interceptor.service)" = notify ] ||
	fail "start: the unit is not Type=notify"

if ! systemctl is-active --quiet interceptor.service; then
	echo "systemd-check: FAIL the daemon did not start: hardening, reload, restart and stop cannot be checked"
	exit 1
fi

# 2. Hardening: the daemon runs as a dynamic user with exactly the three capabilities
#    the unit grants (CAP_NET_ADMIN is bit 12, CAP_PERFMON bit 38, CAP_BPF bit 39),
#    and works.
pid=$(systemctl show -p MainPID --value interceptor.service)
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
capeff=$(awk '/^CapEff:/ { print $2 }' "/proc/$pid/status")
if [ "$uid" != 0 ] && [ "$capeff" = 000000c000001000 ]; then
	pass "hardening: uid $uid, effective capabilities $capeff (CAP_BPF CAP_NET_ADMIN CAP_PERFMON only)"
else
	fail "hardening: uid $uid, effective capabilities $capeff"
fi

# 3. reload applies a changed config: a second VIP works once reload returns; an
#    invalid config is refused by ExecReload and the running one stays.
sed -e 's/name: selftest$/name: selftest-reload/' -e 's/240.240.0.80/240.240.0.81/' \
	/etc/interceptor/selftest.yaml >/etc/interceptor/reload.yaml
chmod 0644 /etc/interceptor/reload.yaml
if systemctl reload interceptor.service && [ "$(get 240.240.0.81)" = "$expected" ]; then
	pass "reload: the changed config is applied when reload returns"
else
	fail "reload: the new VIP 240.240.0.81 does not answer after reload"
fi
echo "this: [is not a ServiceEntry" >/etc/interceptor/broken.yaml
chmod 0644 /etc/interceptor/broken.yaml
if systemctl reload interceptor.service 2>/dev/null; then
	fail "reload: an invalid config was accepted"
elif systemctl is-active --quiet interceptor.service && [ "$(get 240.240.0.81)" = "$expected" ]; then
	pass "reload: an invalid config is refused and the running one stays"
else
	fail "reload: after a refused reload the daemon or its config is gone"
fi
rm -f /etc/interceptor/broken.yaml

# 4. restart keeps the VIP reachable: a client that retries refused connects (as
#    the daemon's detach sends new connects direct, for a moment unanswered) is
#    served throughout. Every request must succeed.
ok=0
bad=0
(
	for _ in $(seq 40); do
		if curl -fsS --max-time 5 --retry 20 --retry-delay 0 --retry-all-errors --retry-max-time 10 \
			-o /dev/null http://240.240.0.80/index.html 2>/dev/null; then
			echo ok
		else echo bad; fi
		sleep 0.1
	done
) >/tmp/restart-results &
loop=$!
sleep 0.5
systemctl restart interceptor.service
wait $loop
ok=$(grep -c ok /tmp/restart-results)
bad=$(grep -c bad /tmp/restart-results)
if [ "$bad" = 0 ] && [ "$ok" -gt 0 ]; then
	pass "restart: $ok requests through the restart, none failed"
else
	fail "restart: $bad of $((ok + bad)) requests failed"
fi

# 5. stop drains: a connection opened before the stop is still served after it
#    began, and the daemon exits 0.
python3 - <<'EOF' >/tmp/drain-result 2>&1 &
import socket, subprocess, time
s = socket.create_connection(("240.240.0.80", 80), timeout=10)
open("/tmp/drain-connected", "w").close()
time.sleep(2)  # the stop has begun by now
s.sendall(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
reply = b""
while chunk := s.recv(4096):
    reply += chunk
print("served" if b"hello from the selftest backend" in reply else "not served: %r" % reply[:200])
EOF
client=$!
for _ in $(seq 50); do [ -e /tmp/drain-connected ] && break; sleep 0.1; done
systemctl stop --no-block interceptor.service
sleep 0.5
state=$(systemctl show -p ActiveState --value interceptor.service)
wait $client
for _ in $(seq 100); do
	[ "$(systemctl show -p ActiveState --value interceptor.service)" = inactive ] && break
	sleep 0.2
done
status=$(systemctl show -p ExecMainStatus --value interceptor.service)
result=$(systemctl show -p Result --value interceptor.service)
if [ "$(cat /tmp/drain-result)" = served ] && [ "$status" = 0 ] && [ "$result" = success ]; then
	pass "stop: an open connection was served while draining ($state), exit status 0"
else
	fail "stop: client: $(cat /tmp/drain-result); state during stop $state; exit status $status; result $result"
fi

journalctl -u interceptor.service --no-pager -o cat | tail -15
echo "systemd-check: $((5 - failures)) of 5 groups without failures"
[ "$failures" = 0 ]
