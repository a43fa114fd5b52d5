# lab-platform installer environment: sourced by the discovery image's /init when the kernel
# command line has lab.script= (the image deploy; see docs/installer.md "Image deploy").
#
# The installer environment is the discovery kernel and initramfs plus one more cpio layer (this
# file, etc/lvm/lvm.conf, the storage and filesystem modules, and the install tools with their
# libraries under /opt/lab). /init has loaded the drivers, leased an address on the boot NIC and
# waited for the disks; lab_install fetches the machine's install script from the bastion and runs
# it with bash. Install tools are /opt/lab/bin/<tool>: the script puts that first on PATH and
# bash looks up PATH (busybox's ash would prefer its own applets of the same names).
#
# Kernel command line: lab.script=URL (the install script, with the machine's install token),
# lab.syslog=HOST:PORT (the bastion's syslog listener: the installer's output goes there).

LAB_TOOLS=/opt/lab/bin

lab_install() {
	KVER=$(uname -r)
	for m in $(cat /etc/lab/installer.modules); do
		insmod "/lib/modules/$KVER/$m.ko" 2>/dev/null
	done
	log "installer modules loaded"
	if [ -d /sys/firmware/efi ] && ! grep -q efivarfs /proc/mounts; then
		mount -t efivarfs efivarfs /sys/firmware/efi/efivars || log "efivarfs not mounted: boot entries cannot be changed"
	fi
	mkdir -p /run/lock/lvm /var/log /target
	# bash's process substitution and /dev/stdin need these (devtmpfs has no /dev/fd)
	[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
	for n in 0:stdin 1:stdout 2:stderr; do [ -e "/dev/${n#*:}" ] || ln -s "/proc/self/fd/${n%%:*}" "/dev/${n#*:}"; done
	if [ -n "$LAB_SYSLOG" ]; then
		syslogd -R "$LAB_SYSLOG" -L -O /var/log/messages && log "installer output also goes to $LAB_SYSLOG"
	fi
	attempt=1
	while ! wget -q -O /tmp/install.sh "$LAB_SCRIPT" 2>/tmp/wget.err; do
		log "could not fetch the install script (attempt $attempt): $(tail -n1 /tmp/wget.err)"
		[ $attempt -ge 8 ] && { log "giving up: rebooting to PXE again in 30 s"; sleep 30; finish reboot; }
		attempt=$((attempt + 1))
		sleep 5
	done
	log "running the install script"
	# the script's output: to the console, to /tmp/install.log (the script reports its last lines
	# when it fails) and to syslog (forwarded to the bastion)
	{ LAB_LOG=/tmp/install.log "$LAB_TOOLS/bash" /tmp/install.sh; echo $? >/tmp/install.rc; } 2>&1 |
		tee -a /tmp/install.log /dev/console | logger -t lab-install
	rc=$(cat /tmp/install.rc 2>/dev/null || echo 1)
	if [ "$rc" = 0 ]; then
		log "installed: rebooting"
		sync
		finish reboot
	fi
	log "the install failed (exit $rc): the bastion has the reason; a shell for inspection (exit to power off)"
	finish shell
}
