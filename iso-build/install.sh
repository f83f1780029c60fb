#!/bin/sh
# Installs (or upgrades) the Quantix KVM guest agent from this ISO, then starts it and waits
# until it has opened its virtio-serial port. POSIX sh: runs under busybox ash, dash and bash.
#
# Usage: sh /path/to/iso/install.sh [options]
#   --prefix DIR     install the binary into DIR/sbin (default /usr/local)
#   --init TYPE      systemd, openrc, sysvinit or busybox (default: detected)
#   --no-start       install and enable the service, do not start or restart it
#   --timeout SECS   how long to wait for the agent to open its port (default 30)
#   --dry-run        print what would be done, change nothing
#   --replace-qemu-ga  stop and disable qemu-guest-agent: this agent serves its protocol on
#                    org.qemu.guest_agent.0 too (uninstall puts qemu-ga back)
#   --uninstall      run uninstall.sh instead (arguments after it go to uninstall.sh)
#   -h, --help       this text
#
# Exit codes:
#   0  installed (and, unless --no-start, the agent has opened its port)
#   1  usage error
#   2  unsupported system: not root, unknown architecture or init system, missing tools
#   3  verification failed: a file of the ISO does not match SHA256SUMS (nothing was changed)
#   4  installation failed while copying or enabling (the message names the step; files
#      already renamed into place stay, the old binary is still running: re-run to finish)
#   5  the new agent did not open its port; the previous binary was restored and restarted
#   6  the agent did not open its port and there was no working previous binary to go back to
#
# Nothing from the ISO is executed before it is verified: every file is copied to the target
# directory under a temporary name, the copy is checked against SHA256SUMS, and only then
# renamed into place. The ISO's own SHA256SUMS is the trust root: it catches a damaged or
# mixed-up image, it does not authenticate one (README).

set -u

NAME=quantix-kvm-agent
PORT_NAME=org.quantix.agent.0
CONF_DIR=/etc/quantix-kvm
CONF=$CONF_DIR/agent.conf
STATE_DIR=/var/lib/quantix-kvm-agent
STATE=$STATE_DIR/installed
LOG=/var/log/quantix-kvm-agent.log

PREFIX=/usr/local
INIT=""
START=1
TIMEOUT=30
DRY=0
REPLACE_QGA=0
QGA_PORT=org.qemu.guest_agent.0
QGA_SERVICE=qemu-guest-agent

say() { printf 'install: %s\n' "$*"; }
warn() { printf 'install: warning: %s\n' "$*" >&2; }
die() {
	code=$1
	shift
	printf 'install: error: %s\n' "$*" >&2
	exit "$code"
}
# Runs a command, or prints it under --dry-run.
run() {
	if [ "$DRY" = 1 ]; then
		printf 'install: would run: %s\n' "$*"
		return 0
	fi
	"$@"
}

SRC=$(cd "$(dirname "$0")" && pwd) || die 2 "cannot find the directory of $0"

while [ $# -gt 0 ]; do
	case "$1" in
	--prefix)
		[ $# -ge 2 ] || die 1 "--prefix needs a directory"
		PREFIX=$2
		shift 2
		;;
	--prefix=*)
		PREFIX=${1#--prefix=}
		shift
		;;
	--init)
		[ $# -ge 2 ] || die 1 "--init needs a type"
		INIT=$2
		shift 2
		;;
	--init=*)
		INIT=${1#--init=}
		shift
		;;
	--timeout)
		[ $# -ge 2 ] || die 1 "--timeout needs a number of seconds"
		TIMEOUT=$2
		shift 2
		;;
	--no-start)
		START=0
		shift
		;;
	--dry-run)
		DRY=1
		shift
		;;
	--replace-qemu-ga)
		REPLACE_QGA=1
		shift
		;;
	--uninstall)
		shift
		UNINSTALL=1
		break
		;;
	-h | --help)
		sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) die 1 "unknown option $1 (see --help)" ;;
	esac
done
case "$TIMEOUT" in
'' | *[!0-9]*) die 1 "--timeout must be a whole number of seconds" ;;
esac
case "$PREFIX" in
/*) ;;
*) die 1 "--prefix must be an absolute path" ;;
esac
PREFIX=${PREFIX%/}
SBIN=$PREFIX/sbin
BIN=$SBIN/$NAME

# What this run adds, for uninstall.sh: one absolute path (or a marker) a line.
RECORD=""
record() { RECORD="$RECORD$1
"; }

# ---- verification ---------------------------------------------------------------------------

[ -f "$SRC/SHA256SUMS" ] || die 3 "$SRC/SHA256SUMS is missing: is this the agent ISO?"
command -v sha256sum >/dev/null 2>&1 || die 2 "sha256sum is not available"

# The manifest hash of a file, by its path relative to the ISO root.
expected_hash() {
	awk -v f="$1" '$2 == f || $2 == "*" f { print $1; exit }' "$SRC/SHA256SUMS"
}
hash_of() { sha256sum "$1" | cut -d' ' -f1; }

# Creates directory $1 and its missing parents, recording each one it creates so that
# uninstall.sh removes them again (when empty).
ensure_dir() {
	[ -d "$1" ] && return 0
	ensure_dir "$(dirname "$1")"
	mkdir "$1" || die 4 "cannot create $1"
	record "dir:$1"
}

# Copies ISO file $1 to $2.qx-new with mode $3 and checks the copy against the manifest.
# On success the verified copy is at $2.qx-new; the caller renames it into place.
fetch() {
	want=$(expected_hash "$1")
	[ -n "$want" ] || die 3 "$1 is not listed in SHA256SUMS"
	if [ "$DRY" = 1 ]; then
		got=$(hash_of "$SRC/$1") || die 3 "cannot read $SRC/$1"
		[ "$got" = "$want" ] || die 3 "$1 does not match SHA256SUMS (got $got, want $want)"
		printf 'install: would install %s -> %s (mode %s, sha256 verified)\n' "$1" "$2" "$3"
		return 0
	fi
	ensure_dir "$(dirname "$2")"
	rm -f "$2.qx-new"
	cp "$SRC/$1" "$2.qx-new" || die 4 "cannot copy $1 to $2.qx-new"
	chmod "$3" "$2.qx-new" || die 4 "cannot chmod $2.qx-new"
	got=$(hash_of "$2.qx-new")
	if [ "$got" != "$want" ]; then
		rm -f "$2.qx-new"
		die 3 "$1 does not match SHA256SUMS (got $got, want $want)"
	fi
}
commit() {
	[ "$DRY" = 1 ] && return 0
	mv -f "$1.qx-new" "$1" || die 4 "cannot move $1 into place"
}

# ---- uninstall ------------------------------------------------------------------------------

if [ "${UNINSTALL:-0}" = 1 ]; then
	want=$(expected_hash uninstall.sh)
	[ -n "$want" ] || die 3 "uninstall.sh is not listed in SHA256SUMS"
	tmp=$(mktemp) || die 4 "mktemp failed"
	cp "$SRC/uninstall.sh" "$tmp" || die 4 "cannot copy uninstall.sh"
	[ "$(hash_of "$tmp")" = "$want" ] || {
		rm -f "$tmp"
		die 3 "uninstall.sh does not match SHA256SUMS"
	}
	[ "$DRY" = 1 ] && set -- --dry-run "$@"
	sh "$tmp" "$@"
	rc=$?
	rm -f "$tmp"
	exit $rc
fi

# ---- system checks --------------------------------------------------------------------------

if [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
	die 2 "must run as root (try: sudo sh $0)"
fi

VERSION=$(cat "$SRC/VERSION" 2>/dev/null) || die 3 "$SRC/VERSION is missing"
[ "$(expected_hash VERSION)" = "$(hash_of "$SRC/VERSION")" ] || die 3 "VERSION does not match SHA256SUMS"

machine=$(uname -m)
case "$machine" in
x86_64 | amd64) ARCH=x86_64 ;;
aarch64 | arm64) ARCH=aarch64 ;;
*) die 2 "unsupported architecture $machine (this ISO has agents for: $(ls "$SRC" | sed -n 's/^quantix-kvm-agent\.//p' | tr '\n' ' ' | sed 's/ $//'))" ;;
esac
[ -f "$SRC/$NAME.$ARCH" ] || die 2 "this ISO has no agent for $ARCH (see its README)"

# Which init system runs this machine. Checked in order of how certain the marker is.
detect_init() {
	# sd_booted(3): systemd creates this directory at boot and nothing else does.
	if [ -d /run/systemd/system ]; then
		echo systemd
		return
	fi
	if [ -d /run/openrc ] || { command -v openrc-run >/dev/null 2>&1 && command -v rc-update >/dev/null 2>&1; }; then
		echo openrc
		return
	fi
	init_exe=$(readlink -f /sbin/init 2>/dev/null)
	case "$init_exe" in
	*busybox*)
		echo busybox
		return
		;;
	esac
	if [ -d /etc/init.d ] && [ -f /etc/inittab ] && grep -q ':initdefault:' /etc/inittab 2>/dev/null; then
		echo sysvinit
		return
	fi
	if [ -d /etc/init.d ] && { command -v update-rc.d >/dev/null 2>&1 || command -v chkconfig >/dev/null 2>&1; }; then
		echo sysvinit
		return
	fi
	# Busybox systems whose init is not at /sbin/init (initramfs shells, embedded images).
	if [ "$(readlink -f /bin/sh 2>/dev/null)" = "$(command -v busybox 2>/dev/null)" ] \
		|| readlink -f /bin/sh 2>/dev/null | grep -q busybox; then
		echo busybox
		return
	fi
	echo unknown
}
[ -n "$INIT" ] || INIT=$(detect_init)
case "$INIT" in
systemd | openrc | sysvinit | busybox) ;;
*) die 2 "cannot tell the init system (systemd, openrc, sysvinit, busybox); pass --init TYPE" ;;
esac

# Every file of the image is checked before anything on the system changes; each copy is
# checked again after it is made (fetch), so a disc swapped mid-run cannot slip through.
while read -r sum file; do
	file=${file#\*}
	case "$file" in
	"$NAME".*) [ "$file" = "$NAME.$ARCH" ] || continue ;;
	esac
	[ -f "$SRC/$file" ] || die 3 "$file is listed in SHA256SUMS but missing from $SRC"
	got=$(hash_of "$SRC/$file") || die 3 "cannot read $SRC/$file"
	[ "$got" = "$sum" ] || die 3 "$file does not match SHA256SUMS (got $got, want $sum)"
done <"$SRC/SHA256SUMS"

say "quantix-kvm-agent $VERSION for $ARCH, init $INIT, into $SBIN"
[ "$DRY" = 1 ] && say "dry run: nothing will be changed"

# ---- helpers for the running agent ----------------------------------------------------------

# The device node the agent opens: the conf's `device =` if set, else the conventional name.
port_path() {
	dev=""
	if [ -f "$CONF" ]; then
		dev=$(sed -n 's/^[[:space:]]*device[[:space:]]*=[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}[[:space:]]*$/\1/p' "$CONF" | tail -n1)
	fi
	[ -n "$dev" ] || dev=/dev/virtio-ports/$PORT_NAME
	echo "$dev"
}
# Without udev nothing names the port: find it in sysfs and make the conventional symlink.
name_port() {
	[ -e "/dev/virtio-ports/$PORT_NAME" ] && return 0
	for p in /sys/class/virtio-ports/vport*; do
		[ -f "$p/name" ] || continue
		if [ "$(cat "$p/name" 2>/dev/null)" = "$PORT_NAME" ] && [ -e "/dev/${p##*/}" ]; then
			run mkdir -p /dev/virtio-ports
			run ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$PORT_NAME"
			say "named /dev/${p##*/} as /dev/virtio-ports/$PORT_NAME"
			return 0
		fi
	done
	return 1
}
# Pids of processes running the installed binary (not a replaced one).
agent_pids() {
	for d in /proc/[0-9]*; do
		[ "$(readlink "$d/exe" 2>/dev/null)" = "$BIN" ] && echo "${d#/proc/}"
	done
}
# True when a process running $BIN holds the port open (the one named $1, default ours): one of
# its fds links to the device.
port_opened() {
	dev=${1:-$(port_path)}
	node=$(readlink -f "$dev" 2>/dev/null)
	for pid in $(agent_pids); do
		for fd in /proc/"$pid"/fd/*; do
			t=$(readlink "$fd" 2>/dev/null) || continue
			if [ "$t" = "$dev" ] || { [ -n "$node" ] && [ "$t" = "$node" ]; }; then
				echo "$pid"
				return 0
			fi
		done
	done
	return 1
}
wait_port() {
	i=0
	# Ten checks a second.
	limit=$((TIMEOUT * 10))
	while [ $i -le "$limit" ]; do
		if pid=$(port_opened); then
			say "agent (pid $pid) has opened $(port_path)"
			return 0
		fi
		sleep 0.1 2>/dev/null || sleep 1
		i=$((i + 1))
	done
	return 1
}

# ---- replacing qemu-ga ----------------------------------------------------------------------

# Pids of running qemu-ga binaries (where distributions install it).
qga_pids() {
	for d in /proc/[0-9]*; do
		case "$(readlink "$d/exe" 2>/dev/null)" in
		/usr/bin/qemu-ga | /usr/sbin/qemu-ga | /usr/local/bin/qemu-ga | /usr/local/sbin/qemu-ga) echo "${d#/proc/}" ;;
		esac
	done
}

# Stops qemu-ga and keeps its init from starting it again; what was done is recorded so that
# uninstall.sh can undo it. The port admits one opener: qemu-ga must be gone before this agent
# can open it.
replace_qemu_ga() {
	case "$INIT" in
	systemd)
		# The unit is started by udev when the port appears: masked, not just disabled.
		run systemctl stop "$QGA_SERVICE.service" || warn "systemctl stop $QGA_SERVICE failed"
		run systemctl mask "$QGA_SERVICE.service" || die 4 "systemctl mask $QGA_SERVICE failed"
		;;
	openrc)
		if [ -f /etc/init.d/$QGA_SERVICE ]; then
			run rc-service "$QGA_SERVICE" stop || warn "rc-service $QGA_SERVICE stop failed"
			run rc-update del "$QGA_SERVICE" default || warn "rc-update del $QGA_SERVICE failed"
		fi
		;;
	sysvinit)
		if [ -f /etc/init.d/$QGA_SERVICE ]; then
			run /etc/init.d/$QGA_SERVICE stop || warn "$QGA_SERVICE stop failed"
			if command -v update-rc.d >/dev/null 2>&1; then
				run update-rc.d "$QGA_SERVICE" disable || die 4 "update-rc.d $QGA_SERVICE disable failed"
			elif command -v chkconfig >/dev/null 2>&1; then
				run chkconfig "$QGA_SERVICE" off || die 4 "chkconfig $QGA_SERVICE off failed"
			fi
		fi
		;;
	busybox)
		if [ -f /etc/inittab ] && grep -q '^[^#].*qemu-ga' /etc/inittab; then
			if [ "$DRY" = 1 ]; then
				say "would comment out the qemu-ga lines of /etc/inittab"
			else
				sed 's/^\([^#].*qemu-ga.*\)$/#qx-replaced# \1/' /etc/inittab >/etc/inittab.qx-new \
					&& cat /etc/inittab.qx-new >/etc/inittab && rm -f /etc/inittab.qx-new \
					|| die 4 "cannot update /etc/inittab"
			fi
			if pid1_is_busybox_init; then run kill -HUP 1; fi
		fi
		;;
	esac
	pids=$(qga_pids)
	if [ -n "$pids" ]; then
		# shellcheck disable=SC2086
		run kill $pids 2>/dev/null
		i=0
		while [ "$DRY" = 0 ] && [ -n "$(qga_pids)" ] && [ $i -lt 50 ]; do
			sleep 0.1 2>/dev/null || sleep 1
			i=$((i + 1))
		done
		left=$(qga_pids)
		# shellcheck disable=SC2086
		[ "$DRY" = 1 ] || [ -z "$left" ] || kill -9 $left 2>/dev/null
	fi
	say "qemu-guest-agent stopped and disabled; this agent serves $QGA_PORT"
}

# ---- service management, per init system ---------------------------------------------------

SERVICE_FILE=""
case "$INIT" in
systemd) SERVICE_FILE=/etc/systemd/system/$NAME.service ;;
openrc | sysvinit) SERVICE_FILE=/etc/init.d/$NAME ;;
busybox)
	if [ -d /etc/sv ] || [ -d /etc/service ] || [ -d /var/service ]; then
		SERVICE_FILE=/etc/sv/$NAME/run
	fi
	;;
esac

# The ISO's service files name /usr/local/sbin; rewrite for another prefix after verifying.
rewrite_prefix() {
	[ "$DRY" = 1 ] && return 0
	[ "$SBIN" = /usr/local/sbin ] && return 0
	sed "s|/usr/local/sbin/|$SBIN/|g" "$1" >"$1.tmp" && cat "$1.tmp" >"$1" && rm -f "$1.tmp"
}

install_service() {
	case "$INIT" in
	systemd)
		fetch service/systemd/$NAME.service "$SERVICE_FILE" 0644
		rewrite_prefix "$SERVICE_FILE.qx-new"
		commit "$SERVICE_FILE"
		run systemctl daemon-reload || die 4 "systemctl daemon-reload failed"
		run systemctl enable "$NAME.service" || die 4 "systemctl enable failed"
		;;
	openrc)
		fetch service/openrc/$NAME "$SERVICE_FILE" 0755
		rewrite_prefix "$SERVICE_FILE.qx-new"
		commit "$SERVICE_FILE"
		run rc-update add "$NAME" default || die 4 "rc-update add failed"
		;;
	sysvinit)
		fetch service/sysvinit/$NAME "$SERVICE_FILE" 0755
		rewrite_prefix "$SERVICE_FILE.qx-new"
		commit "$SERVICE_FILE"
		if command -v update-rc.d >/dev/null 2>&1; then
			run update-rc.d "$NAME" defaults || die 4 "update-rc.d failed"
		elif command -v chkconfig >/dev/null 2>&1; then
			run chkconfig --add "$NAME" || die 4 "chkconfig --add failed"
		else
			for l in 2 3 4 5; do
				run mkdir -p /etc/rc$l.d
				run ln -sf ../init.d/$NAME /etc/rc$l.d/S90$NAME
			done
			for l in 0 1 6; do
				run mkdir -p /etc/rc$l.d
				run ln -sf ../init.d/$NAME /etc/rc$l.d/K10$NAME
			done
		fi
		;;
	busybox)
		if [ -n "$SERVICE_FILE" ]; then
			fetch service/busybox/run "$SERVICE_FILE" 0755
			rewrite_prefix "$SERVICE_FILE.qx-new"
			commit "$SERVICE_FILE"
			for d in /etc/service /var/service; do
				[ -d "$d" ] && run ln -sfn /etc/sv/$NAME "$d/$NAME"
			done
		fi
		# The inittab line makes busybox init respawn the agent from the next boot on (and at
		# once when init re-reads inittab on SIGHUP).
		fetch service/busybox/inittab /run/$NAME.inittab 0644
		if [ "$DRY" = 0 ]; then
			rewrite_prefix /run/$NAME.inittab.qx-new
			line=$(cat /run/$NAME.inittab.qx-new)
			rm -f /run/$NAME.inittab.qx-new
			if ! grep -qxF "$line" /etc/inittab 2>/dev/null; then
				# Drop a line of an older install (another prefix), then add ours.
				if [ -f /etc/inittab ]; then
					grep -v "# $NAME\$" /etc/inittab >/etc/inittab.qx-new
					cat /etc/inittab.qx-new >/etc/inittab
					rm -f /etc/inittab.qx-new
				fi
				printf '%s\n' "$line" | sed "s|\$| # $NAME|" >>/etc/inittab || die 4 "cannot update /etc/inittab"
			fi
		fi
		;;
	esac
}

# Is PID 1 busybox init (which re-reads /etc/inittab on SIGHUP)? Its executable is busybox and
# its argv[0] is init (or linuxrc). A busybox *shell* running an /init script also has comm
# "init", but its argv[0] is busybox or sh: a SIGHUP would kill that PID 1, so it must not match.
pid1_is_busybox_init() {
	readlink /proc/1/exe 2>/dev/null | grep -q busybox || return 1
	argv0=$(tr '\0' '\n' </proc/1/cmdline 2>/dev/null | head -n1)
	case "${argv0##*/}" in
	init | linuxrc) return 0 ;;
	esac
	return 1
}

# Pids of every agent started from $BIN or its replaced versions.
all_agent_pids() {
	for d in /proc/[0-9]*; do
		case "$(readlink "$d/exe" 2>/dev/null)" in
		"$BIN" | "$BIN (deleted)" | "$BIN.old" | "$BIN.old (deleted)") echo "${d#/proc/}" ;;
		esac
	done
}
# True while pid $1 is alive (a zombie has exited: only its parent has not reaped it yet).
alive() {
	[ -d "/proc/$1" ] || return 1
	state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)
	[ -n "$state" ] && [ "$state" != Z ]
}
# Stops every agent (busybox without a supervisor) and waits for it to exit: the port admits
# one opener, so the new agent could not open it while the old one holds it.
kill_agents() {
	pids=$(all_agent_pids)
	[ -n "$pids" ] || return 0
	# shellcheck disable=SC2086
	kill $pids 2>/dev/null
	i=0
	while [ $i -lt 50 ]; do
		left=""
		for p in $pids; do alive "$p" && left="$left $p"; done
		[ -n "$left" ] || return 0
		sleep 0.1 2>/dev/null || sleep 1
		i=$((i + 1))
	done
	# shellcheck disable=SC2086
	kill -9 $left 2>/dev/null
	return 0
}

# (Re)starts the service so that the binary now at $BIN runs.
restart_service() {
	case "$INIT" in
	systemd) run systemctl restart "$NAME.service" ;;
	openrc) run rc-service "$NAME" restart ;;
	sysvinit)
		if command -v invoke-rc.d >/dev/null 2>&1; then
			run invoke-rc.d "$NAME" restart
		else
			run /etc/init.d/$NAME restart
		fi
		;;
	busybox)
		if [ -n "$SERVICE_FILE" ] && command -v sv >/dev/null 2>&1 \
			&& { [ -d /etc/service/$NAME ] || [ -d /var/service/$NAME ]; }; then
			run sv restart "$NAME"
		elif pid1_is_busybox_init; then
			# init respawns the agent from the new binary after the old one exits.
			run kill -HUP 1
			if [ "$DRY" = 0 ]; then kill_agents; fi
		else
			# No supervisor at all (e.g. an initramfs shell as PID 1): start it ourselves.
			if [ "$DRY" = 1 ]; then
				say "would start $BIN in the background"
			else
				kill_agents
				mkdir -p "$(dirname "$LOG")"
				# shellcheck disable=SC2086
				setsid "$BIN" --config "$CONF" </dev/null >>"$LOG" 2>&1 &
				echo $! >/run/$NAME.pid
			fi
		fi
		;;
	esac
}

# ---- install --------------------------------------------------------------------------------


upgrade=0
[ -f "$BIN" ] && upgrade=1

# 1. The binary, verified, next to the old one.
fetch "$NAME.$ARCH" "$BIN" 0755
if [ "$DRY" = 0 ]; then
	newver=$("$BIN.qx-new" --version 2>/dev/null | head -n1)
	case "$newver" in
	"$NAME $VERSION" | "$NAME $VERSION "*) ;;
	*)
		rm -f "$BIN.qx-new"
		die 3 "the verified binary reports '$newver', expected '$NAME $VERSION'"
		;;
	esac
fi
if [ "$upgrade" = 1 ]; then
	oldver=$("$BIN" --version 2>/dev/null | head -n1)
	say "upgrading ${oldver:-an unknown version}; the previous binary stays at $BIN.old"
	if [ "$DRY" = 0 ]; then
		cp -p "$BIN" "$BIN.old" || die 4 "cannot keep the previous binary as $BIN.old"
	fi
	record "$BIN.old"
fi
commit "$BIN"
record "$BIN"

# 2. The uninstaller, so that removal does not need the ISO.
fetch uninstall.sh "$SBIN/$NAME-uninstall" 0755
commit "$SBIN/$NAME-uninstall"
record "$SBIN/$NAME-uninstall"

# 3. The configuration: an existing one is kept.
if [ -f "$CONF" ]; then
	say "keeping the existing $CONF"
else
	fetch agent.conf "$CONF" 0644
	commit "$CONF"
	record "conf:$CONF"
fi

# 4. The udev rule, where udev runs the system.
if command -v udevadm >/dev/null 2>&1 || [ -d /etc/udev/rules.d ]; then
	fetch udev/60-$NAME.rules /etc/udev/rules.d/60-$NAME.rules 0644
	commit /etc/udev/rules.d/60-$NAME.rules
	record /etc/udev/rules.d/60-$NAME.rules
	if command -v udevadm >/dev/null 2>&1 && [ -d /sys/class/virtio-ports ]; then
		run udevadm control --reload >/dev/null 2>&1
		run udevadm trigger --subsystem-match=virtio-ports >/dev/null 2>&1
		run udevadm settle --timeout=5 >/dev/null 2>&1
	fi
else
	say "no udev: the agent finds its port by name in sysfs"
fi

# 5. The service definition, enabled.
install_service
[ -n "$SERVICE_FILE" ] && record "$SERVICE_FILE"
case "$INIT" in
busybox) record "inittab:$NAME" ;;
*) record "service:$INIT" ;;
esac

# 6. qemu-ga, when this agent is to take its port.
QGA_REPLACED=""
[ -f "$STATE" ] && QGA_REPLACED=$(sed -n 's/^qemu_ga=//p' "$STATE" | tail -n1)
if [ "$REPLACE_QGA" = 1 ]; then
	replace_qemu_ga
	QGA_REPLACED=$INIT
fi

# 7. The state file: what uninstall.sh removes (and whether it puts qemu-ga back).
if [ "$DRY" = 0 ]; then
	ensure_dir "$STATE_DIR"
	{
		echo "version=$VERSION"
		echo "init=$INIT"
		echo "prefix=$PREFIX"
		[ -z "$QGA_REPLACED" ] || echo "qemu_ga=$QGA_REPLACED"
		# Merge with an earlier install's list so an upgrade keeps what it added.
		[ -f "$STATE" ] && sed -n 's/^file=//p' "$STATE" | sed 's/^/file=/'
		printf '%s' "$RECORD" | sed '/^$/d; s/^/file=/'
	} | awk '!seen[$0]++' >"$STATE.qx-new" && mv -f "$STATE.qx-new" "$STATE" || die 4 "cannot write $STATE"
fi

if [ "$START" = 0 ]; then
	say "installed $VERSION; not started (--no-start)"
	exit 0
fi

# 8. Start (or restart onto the new binary) and wait for the port.
name_port || true
restart_service || warn "starting the service reported a failure; waiting for the port anyway"
if [ "$DRY" = 1 ]; then
	say "would wait up to ${TIMEOUT}s for the agent to open $(port_path)"
	exit 0
fi
if wait_port; then
	if [ "$REPLACE_QGA" = 1 ]; then
		# The qemu-ga port, when the VM has one, is opened by the same process.
		qdev=/dev/virtio-ports/$QGA_PORT
		for p in /sys/class/virtio-ports/vport*; do
			[ "$(cat "$p/name" 2>/dev/null)" = "$QGA_PORT" ] && qdev=/dev/${p##*/}
		done
		if [ -e "$qdev" ]; then
			i=0
			while ! port_opened "$qdev" >/dev/null && [ $i -lt $((TIMEOUT * 10)) ]; do
				sleep 0.1 2>/dev/null || sleep 1
				i=$((i + 1))
			done
			port_opened "$qdev" >/dev/null && say "the agent has opened $qdev (qemu-ga's port)" \
				|| warn "the agent has not opened $qdev within ${TIMEOUT}s"
		fi
	fi
	say "installed and running: quantix-kvm-agent $VERSION"
	exit 0
fi

warn "the new agent did not open $(port_path) within ${TIMEOUT}s (log: $LOG or the service's journal)"
if [ "$upgrade" = 1 ] && [ -f "$BIN.old" ]; then
	say "rolling back to the previous binary"
	cp -p "$BIN.old" "$BIN.qx-new" && mv -f "$BIN.qx-new" "$BIN" || die 6 "cannot restore $BIN.old"
	restart_service
	if wait_port; then
		die 5 "rolled back: the previous agent is running again; the new one ($VERSION) did not start"
	fi
	die 6 "the previous agent did not open the port either"
fi
die 6 "the agent did not open its port; is the VM's org.quantix.agent.0 channel configured?"
