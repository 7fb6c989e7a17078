#!/bin/sh
# Provisions a Debian machine as an interceptor host. Two callers run it, so the
# Vagrant rig and the kernel matrix cannot drift apart:
#   - Vagrant (deploy/vagrant/Vagrantfile), in the VM, with the repository at /vagrant;
#   - `cargo xtask vm`, in the debootstrap tree of its image (chroot, no network), with
#     the repository's deploy/ and examples/ copied to --source.
# It installs the systemd unit and a sample config; when the source holds a built
# binary (target/release/interceptor or target/debug/interceptor) it installs that
# too and enables the service. Idempotent.
set -eu

source=/vagrant
while [ $# -gt 0 ]; do
	case "$1" in
	--source) source=$2; shift 2 ;;
	*) echo "provision.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done

# What the daemon and the tests run besides themselves. debootstrap's --include
# brings these for the image; a Vagrant box may lack some.
packages="iproute2 procps ca-certificates curl python3"
missing=""
for package in $packages; do
	dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
		missing="$missing $package"
done
if [ -n "$missing" ]; then
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

install -d -m 0755 /etc/interceptor
install -m 0644 "$source/deploy/systemd/interceptor.service" /etc/systemd/system/interceptor.service
install -m 0644 "$source/deploy/vagrant/selftest.yaml" /etc/interceptor/selftest.yaml
install -m 0755 "$source/deploy/vagrant/interceptor-selftest" /usr/local/bin/interceptor-selftest
install -m 0644 "$source/deploy/vagrant/selftest-backend.service" /etc/systemd/system/selftest-backend.service

binary=""
for candidate in "$source/target/release/interceptor" "$source/target/debug/interceptor"; do
	if [ -x "$candidate" ]; then binary=$candidate; break; fi
done
if [ -n "$binary" ]; then
	install -m 0755 "$binary" /usr/local/bin/interceptor
	systemctl daemon-reload
	systemctl enable --now selftest-backend.service interceptor.service
else
	echo "provision.sh: no built interceptor under $source/target: unit and config installed, service not enabled"
fi
