# Runs in the guest through the agent's exec (qxctl agent install; iso-build/vm-test.sh), as
# `sh -c "$(cat guest-launch.sh)" qx-agent-install [install.sh options...]`.
# Finds the agent ISO by content (install.sh, SHA256SUMS and VERSION at its root), mounts it
# read-only and starts install.sh DETACHED, then returns at once: the installer restarts the
# agent that ran this, so it must not be the agent's child in its cgroup (systemd) or hold the
# agent's output pipes. The installer's exit status lands in /run/quantix-kvm-agent-install.rc
# (written whole, by rename) and its output in /var/log/quantix-kvm-agent-install.log.
# Exit: 0 started, 10 no agent ISO in any drive, 11 systemd-run failed.
set -u
rcf=/run/quantix-kvm-agent-install.rc
log=/var/log/quantix-kvm-agent-install.log
mnt=/run/quantix-kvm-agent-iso
rm -f "$rcf" "$rcf.tmp"
mkdir -p "$mnt" "$(dirname "$log")"
umount "$mnt" 2>/dev/null
modprobe isofs 2>/dev/null
modprobe sr_mod 2>/dev/null
found=""
# The host has just inserted the disc: the guest may see the new medium a moment later
# (seconds under TCG), so look again once a second for up to 15 s.
tries=0
while [ -z "$found" ] && [ "$tries" -lt 15 ]; do
	[ "$tries" -gt 0 ] && sleep 1
	tries=$((tries + 1))
	for d in /dev/disk/by-label/QX_AGENT_* /dev/sr* /dev/vd* /dev/hd* /dev/xvd* /dev/sd*; do
		[ -b "$d" ] || continue
		mount -t iso9660 -o ro "$d" "$mnt" 2>/dev/null || continue
		if [ -f "$mnt/install.sh" ] && [ -f "$mnt/SHA256SUMS" ] && [ -f "$mnt/VERSION" ]; then
			found=$d
			break
		fi
		umount "$mnt" 2>/dev/null
	done
done
if [ -z "$found" ]; then
	echo "no agent ISO found in any drive" >&2
	exit 10
fi
# Options only (no spaces inside one): they are word-split into install.sh's command line.
job="sh $mnt/install.sh $* >$log 2>&1; echo \$? >$rcf.tmp; mv -f $rcf.tmp $rcf; umount $mnt 2>/dev/null"
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then
	systemctl reset-failed quantix-kvm-agent-install.service 2>/dev/null
	systemd-run --quiet --collect --unit=quantix-kvm-agent-install sh -c "$job" || exit 11
else
	setsid sh -c "$job" </dev/null >/dev/null 2>&1 &
fi
echo "installing $(cat "$mnt/VERSION") from $found"
