#!/bin/sh
# chpasswd for the test image: Debian's busybox-static has no chpasswd applet, and the agent
# sets passwords the way every distribution does, through `chpasswd` ("user:password" lines on
# stdin; -e: the password is already a crypt(3) hash). Same input, same effect on /etc/shadow.
crypted=0
[ "${1:-}" = "-e" ] && crypted=1
status=0
while IFS= read -r line; do
  user=${line%%:*}
  pw=${line#*:}
  if ! grep -q "^$user:" /etc/shadow; then
    echo "chpasswd: user '$user' does not exist" >&2
    status=1
    continue
  fi
  if [ $crypted = 1 ]; then hash=$pw; else hash=$(mkpasswd -m sha512 "$pw") || exit 1; fi
  awk -F: -v OFS=: -v u="$user" -v h="$hash" '$1 == u { $2 = h } { print }' /etc/shadow \
    >/etc/shadow.new && chmod 0600 /etc/shadow.new && mv /etc/shadow.new /etc/shadow || exit 1
done
exit $status
