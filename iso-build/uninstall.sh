#!/bin/sh
# Removes what the Quantix KVM agent's install.sh added: stops and disables the service, then
# deletes the files listed in /var/lib/quantix-kvm-agent/installed. Keeps
# /etc/quantix-kvm/agent.conf unless --purge. Installed as /usr/local/sbin/quantix-kvm-agent-uninstall
# (under the install prefix), and on the ISO (`sh install.sh --uninstall`). POSIX sh.
#
# Usage: uninstall.sh [--purge] [--dry-run] [-h|--help]
#
# Exit codes:
#   0  removed (or nothing was installed)
#   1  usage error
#   2  not root
#   4  something could not be removed (the messages say what)

set -u

NAME=quantix-kvm-agent
CONF_DIR=/etc/quantix-kvm
STATE_DIR=/var/lib/quantix-kvm-agent
STATE=$STATE_DIR/installed

PURGE=0
DRY=0
while [ $# -gt 0 ]; do
	case "$1" in
	--purge) PURGE=1 ;;
	--dry-run) DRY=1 ;;
	-h | --help)
		sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		printf 'uninstall: error: unknown option %s\n' "$1" >&2
		exit 1
		;;
	esac
	shift
done

say() { printf 'uninstall: %s\n' "$*"; }
warn() { printf 'uninstall: warning: %s\n' "$*" >&2; }
run() {
	if [ "$DRY" = 1 ]; then
		printf 'uninstall: would run: %s\n' "$*"
		return 0
	fi
	"$@"
}

if [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
	printf 'uninstall: error: must run as root\n' >&2
	exit 2
fi
if [ ! -f "$STATE" ]; then
	say "nothing to remove: $STATE does not exist"
	exit 0
fi

INIT=$(sed -n 's/^init=//p' "$STATE" | tail -n1)
PREFIX=$(sed -n 's/^prefix=//p' "$STATE" | tail -n1)
BIN=${PREFIX:-/usr/local}/sbin/$NAME
failed=0

# Stop and disable the service first, so nothing respawns the agent while its files go.
case "$INIT" in
systemd)
	run systemctl disable --now "$NAME.service" || warn "systemctl disable --now failed"
	;;
openrc)
	run rc-service "$NAME" stop || warn "rc-service stop failed"
	run rc-update del "$NAME" default || warn "rc-update del failed"
	;;
sysvinit)
	run /etc/init.d/$NAME stop || warn "$NAME stop failed"
	if command -v update-rc.d >/dev/null 2>&1; then
		run update-rc.d -f "$NAME" remove || warn "update-rc.d remove failed"
	elif command -v chkconfig >/dev/null 2>&1; then
		run chkconfig --del "$NAME" || warn "chkconfig --del failed"
	else
		for l in 0 1 2 3 4 5 6; do
			for f in /etc/rc$l.d/S90$NAME /etc/rc$l.d/K10$NAME; do
				[ -L "$f" ] && run rm -f "$f"
			done
		done
	fi
	;;
busybox)
	if [ -f /etc/inittab ] && grep -q "# $NAME\$" /etc/inittab; then
		if [ "$DRY" = 1 ]; then
			say "would remove the $NAME line from /etc/inittab"
		else
			grep -v "# $NAME\$" /etc/inittab >/etc/inittab.qx-new && cat /etc/inittab.qx-new >/etc/inittab
			rm -f /etc/inittab.qx-new
		fi
		# busybox init drops respawn entries that left inittab when it re-reads it.
		# Only when PID 1 is busybox init itself (argv[0] init), never a shell running /init.
		argv0=$(tr '\0' '\n' </proc/1/cmdline 2>/dev/null | head -n1)
		if readlink /proc/1/exe 2>/dev/null | grep -q busybox \
			&& { [ "${argv0##*/}" = init ] || [ "${argv0##*/}" = linuxrc ]; }; then
			run kill -HUP 1
		fi
	fi
	for d in /etc/service /var/service; do
		[ -L "$d/$NAME" ] && run rm -f "$d/$NAME"
	done
	;;
esac

# Any agent still running from the installed binary: TERM, up to 5 s to exit, then KILL.
agent_pids() {
	for d in /proc/[0-9]*; do
		case "$(readlink "$d/exe" 2>/dev/null)" in
		"$BIN" | "$BIN (deleted)" | "$BIN.old" | "$BIN.old (deleted)") echo "${d#/proc/}" ;;
		esac
	done
}
pids=$(agent_pids)
if [ -n "$pids" ]; then
	# shellcheck disable=SC2086
	run kill $pids 2>/dev/null
	i=0
	# A zombie has no exe link, so it drops out of agent_pids.
	while [ "$DRY" = 0 ] && [ -n "$(agent_pids)" ] && [ $i -lt 50 ]; do
		sleep 0.1 2>/dev/null || sleep 1
		i=$((i + 1))
	done
	left=$(agent_pids)
	# shellcheck disable=SC2086
	[ "$DRY" = 1 ] || [ -z "$left" ] || kill -9 $left 2>/dev/null
fi

sed -n 's/^file=//p' "$STATE" | while read -r entry; do
	case "$entry" in
	conf:*)
		f=${entry#conf:}
		if [ "$PURGE" = 1 ]; then
			[ -e "$f" ] && { run rm -f "$f" || warn "cannot remove $f"; }
		else
			say "keeping $f (--purge removes it)"
		fi
		;;
	inittab:* | service:* | dir:*) ;;
	/*)
		if [ -e "$entry" ] || [ -L "$entry" ]; then
			run rm -f "$entry" || warn "cannot remove $entry"
		fi
		# The runit service directory holds only our run script.
		case "$entry" in
		/etc/sv/$NAME/run) run rmdir /etc/sv/$NAME 2>/dev/null ;;
		esac
		;;
	esac
done

if [ "$INIT" = systemd ]; then
	run systemctl daemon-reload || warn "systemctl daemon-reload failed"
fi

# qemu-ga, if install.sh --replace-qemu-ga stopped it: enabled and started again (the port is
# free now that this agent is gone).
QGA_SERVICE=qemu-guest-agent
case "$(sed -n 's/^qemu_ga=//p' "$STATE" | tail -n1)" in
systemd)
	run systemctl unmask "$QGA_SERVICE.service" || warn "systemctl unmask $QGA_SERVICE failed"
	run systemctl start "$QGA_SERVICE.service" || warn "systemctl start $QGA_SERVICE failed"
	say "qemu-guest-agent is back"
	;;
openrc)
	if [ -f /etc/init.d/$QGA_SERVICE ]; then
		run rc-update add "$QGA_SERVICE" default || warn "rc-update add $QGA_SERVICE failed"
		run rc-service "$QGA_SERVICE" start || warn "rc-service $QGA_SERVICE start failed"
		say "qemu-guest-agent is back"
	fi
	;;
sysvinit)
	if [ -f /etc/init.d/$QGA_SERVICE ]; then
		if command -v update-rc.d >/dev/null 2>&1; then
			run update-rc.d "$QGA_SERVICE" enable || warn "update-rc.d $QGA_SERVICE enable failed"
		elif command -v chkconfig >/dev/null 2>&1; then
			run chkconfig "$QGA_SERVICE" on || warn "chkconfig $QGA_SERVICE on failed"
		fi
		run /etc/init.d/$QGA_SERVICE start || warn "$QGA_SERVICE start failed"
		say "qemu-guest-agent is back"
	fi
	;;
busybox)
	if [ -f /etc/inittab ] && grep -q '^#qx-replaced# ' /etc/inittab; then
		if [ "$DRY" = 1 ]; then
			say "would restore the qemu-ga lines of /etc/inittab"
		else
			sed 's/^#qx-replaced# //' /etc/inittab >/etc/inittab.qx-new && cat /etc/inittab.qx-new >/etc/inittab
			rm -f /etc/inittab.qx-new
		fi
		argv0=$(tr '\0' '\n' </proc/1/cmdline 2>/dev/null | head -n1)
		if readlink /proc/1/exe 2>/dev/null | grep -q busybox \
			&& { [ "${argv0##*/}" = init ] || [ "${argv0##*/}" = linuxrc ]; }; then
			run kill -HUP 1
		fi
		say "qemu-guest-agent is back in /etc/inittab"
	fi
	;;
esac
if command -v udevadm >/dev/null 2>&1 && [ -d /sys/class/virtio-ports ]; then
	run udevadm control --reload >/dev/null 2>&1
fi

for f in /run/$NAME.pid; do
	[ -e "$f" ] && run rm -f "$f"
done
# Directories install.sh created, deepest first (paths hold no spaces: install.sh made them).
dirs=$(sed -n 's/^file=dir://p' "$STATE" | sort -r)
run rm -f "$STATE" || failed=1
if [ "$PURGE" = 1 ]; then
	# The configuration goes even when an earlier install created it (kept by a plain uninstall).
	[ -e "$CONF_DIR/agent.conf" ] && run rm -f "$CONF_DIR/agent.conf"
	run rmdir "$CONF_DIR" 2>/dev/null
fi

# Directories install.sh created, deepest first, when nothing else has been put in them.
run rmdir "$STATE_DIR" 2>/dev/null
for d in $dirs; do
	[ -d "$d" ] && run rmdir "$d" 2>/dev/null
done

# Anything left that should be gone?
if [ "$DRY" = 0 ]; then
	for f in "$BIN" "$BIN.old" "${PREFIX:-/usr/local}/sbin/$NAME-uninstall"; do
		if [ -e "$f" ]; then
			warn "$f is still there"
			failed=1
		fi
	done
fi
if [ "$failed" = 1 ]; then
	printf 'uninstall: error: some files could not be removed\n' >&2
	exit 4
fi
say "removed quantix-kvm-agent"
exit 0
