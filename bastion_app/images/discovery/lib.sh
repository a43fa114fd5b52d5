# lab-platform discovery: shell library (busybox ash). Sourced by /init; the tests source it too.
#
# Everything here only reads /proc and /sys (overridable with $SYSFS and $PROCFS for tests), or asks
# the BMC (ipmitool lan print, read only), and prints JSON on stdout. No function changes the machine.

SYSFS=${SYSFS:-/sys}
DEVDIR=${DEVDIR:-/dev}
PROCFS=${PROCFS:-/proc}

# json_str VALUE: print VALUE as a JSON string literal (with the quotes).
# Byte-exact: ", \ and control characters are escaped, valid UTF-8 becomes \uXXXX escapes
# (surrogate pairs above U+FFFF), invalid bytes become \ufffd. The output is pure ASCII.
json_str() {
	_json_escape "$1" 0
}

# json_text VALUE: json_str for free text the bastion shows to people (its "Text" type): control
# characters become spaces and the value is cut to 256 characters, so that no vendor's odd DMI
# string can get the whole report rejected.
json_text() {
	_json_escape "$1" 256
}

_json_escape() {
	printf '%s' "$1" | od -An -v -tu1 | awk -v max="$2" '
	{ for (i = 1; i <= NF; i++) b[++n] = $i + 0 }
	function hex4(v) { return sprintf("\\u%04x", v) }
	function cont(k) { return (k <= n && b[k] >= 128 && b[k] < 192) }
	END {
		out = "\""
		i = 1
		chars = 0
		while (i <= n) {
			if (max > 0 && chars >= max) break
			chars++
			c = b[i]
			if (max > 0 && (c < 32 || c == 127)) { out = out " "; i++; continue }
			if (c == 34) { out = out "\\\""; i++; continue }
			if (c == 92) { out = out "\\\\"; i++; continue }
			if (c == 10) { out = out "\\n"; i++; continue }
			if (c == 13) { out = out "\\r"; i++; continue }
			if (c == 9) { out = out "\\t"; i++; continue }
			if (c < 32 || c == 127) { out = out hex4(c); i++; continue }
			if (c < 128) { out = out sprintf("%c", c); i++; continue }
			cp = -1; len = 1
			if (c >= 194 && c <= 223 && cont(i + 1)) {
				cp = (c - 192) * 64 + (b[i + 1] - 128); len = 2
			} else if (c >= 224 && c <= 239 && cont(i + 1) && cont(i + 2)) {
				cp = ((c - 224) * 64 + (b[i + 1] - 128)) * 64 + (b[i + 2] - 128); len = 3
				if (cp < 2048 || (cp >= 55296 && cp <= 57343)) { cp = -1; len = 1 }
			} else if (c >= 240 && c <= 244 && cont(i + 1) && cont(i + 2) && cont(i + 3)) {
				cp = (((c - 240) * 64 + (b[i + 1] - 128)) * 64 + (b[i + 2] - 128)) * 64 + (b[i + 3] - 128); len = 4
				if (cp < 65536 || cp > 1114111) { cp = -1; len = 1 }
			}
			if (cp < 0) { out = out "\\ufffd"; i++; continue }
			if (cp >= 65536) {
				cp -= 65536
				out = out hex4(55296 + int(cp / 1024)) hex4(56320 + cp % 1024)
			} else {
				out = out hex4(cp)
			}
			i += len
		}
		printf "%s\"", out
	}'
}

# read_attr FILE: the file's first line without surrounding blanks, or nothing.
read_attr() {
	_v=
	[ -r "$1" ] || return 0
	IFS= read -r _v <"$1" 2>/dev/null || true
	# trim leading and trailing spaces and tabs
	while :; do
		case "$_v" in
		" "* | "	"*) _v=${_v#?} ;;
		*" " | *"	") _v=${_v%?} ;;
		*) break ;;
		esac
	done
	printf '%s' "$_v"
}

# read_int FILE [DEFAULT]: the file's integer value, or DEFAULT (0).
read_int() {
	_i=$(read_attr "$1")
	case "$_i" in
	'' | *[!0-9-]* | -) printf '%s' "${2:-0}" ;;
	*) printf '%s' "$_i" ;;
	esac
}

json_bool() {
	if [ "$1" = 1 ] || [ "$1" = true ]; then printf true; else printf false; fi
}

inventory_cpu() {
	awk -F '\t*: *' -v arch="$(uname -m)" '
	$1 == "processor" { threads++ }
	$1 == "model name" && model == "" { model = $2 }
	$1 == "physical id" { phys = $2 }
	$1 == "core id" { core = $2 }
	/^$/ { if (core != "") cores[phys ":" core] = 1; phys = ""; core = "" }
	END {
		if (core != "") cores[phys ":" core] = 1
		n = 0; for (k in cores) n++
		if (n == 0) n = threads
		printf "%s\t%d\t%d\t%s\n", model, n, threads, arch
	}' "$PROCFS/cpuinfo" | {
		IFS='	' read -r model cores threads arch
		printf '{"model": %s, "cores": %d, "threads": %d, "arch": %s}' \
			"$(json_text "$model")" "${cores:-0}" "${threads:-0}" "$(json_text "${arch:-x86_64}")"
	}
}

# Installed memory in MiB: the online memory blocks (whole DIMM-sized units, what the operator
# gave the machine), else MemTotal (which misses what the kernel and firmware reserve).
inventory_memory_mb() {
	_bs=$(read_attr "$SYSFS/devices/system/memory/block_size_bytes")
	_n=0
	if [ -n "$_bs" ]; then
		for _s in "$SYSFS"/devices/system/memory/memory*/online; do
			[ "$(read_attr "$_s")" = 1 ] && _n=$((_n + 1))
		done
	fi
	if [ "$_n" -gt 0 ]; then
		echo $((_n * 0x$_bs / 1048576))
	else
		awk '$1 == "MemTotal:" { printf "%d\n", $2 / 1024 }' "$PROCFS/meminfo"
	fi
}

# SCSI/SATA serial number from VPD page 0x80 (4-byte header, then the serial).
_vpd80_serial() {
	[ -r "$1" ] || return 0
	dd if="$1" bs=1 skip=4 2>/dev/null | tr -d '\000' | tr -c '[:print:]' ' '
}

disk_transport() {
	_name=$1 _path=$2
	case "$_name" in
	vd*) echo virtio; return ;;
	nvme*) echo nvme; return ;;
	esac
	case "$_path" in
	*/usb[0-9]*) echo usb ;;
	*/ata[0-9]*) echo sata ;;
	*/nvme*) echo nvme ;;
	*/host[0-9]*/target*) echo scsi ;;
	*/virtio[0-9]*) echo virtio ;;
	*) echo unknown ;;
	esac
}

inventory_disks() {
	_first=1
	printf '['
	for _d in "$SYSFS"/block/*; do
		[ -e "$_d" ] || continue
		_name=${_d##*/}
		case "$_name" in
		loop* | ram* | zram* | dm-* | md* | sr* | fd* | nbd* | drbd*) continue ;;
		esac
		[ -e "$_d/device" ] || continue
		_size=$(($(read_int "$_d/size") * 512))
		_model=$(read_attr "$_d/device/model")
		_serial=$(read_attr "$_d/device/serial")
		[ -n "$_serial" ] || _serial=$(read_attr "$_d/serial")
		[ -n "$_serial" ] || _serial=$(_vpd80_serial "$_d/device/vpd_pg80" | sed 's/^ *//; s/ *$//')
		_real=$(readlink -f "$_d" 2>/dev/null || echo "$_d")
		[ $_first = 1 ] || printf ', '
		_first=0
		printf '{"name": %s, "size_bytes": %s, "model": %s, "serial": %s, "rotational": %s, "removable": %s, "transport": %s}' \
			"$(json_text "$_name")" "$_size" "$(json_text "$_model")" "$(json_text "$_serial")" \
			"$(json_bool "$(read_attr "$_d/queue/rotational")")" "$(json_bool "$(read_attr "$_d/removable")")" \
			"$(json_str "$(disk_transport "$_name" "$_real")")"
	done
	printf ']'
}

inventory_nics() {
	_first=1
	printf '['
	for _n in "$SYSFS"/class/net/*; do
		[ -e "$_n/device" ] || continue # physical NICs only (no lo, bridges, tunnels)
		_name=${_n##*/}
		_mac=$(read_attr "$_n/address")
		case "$_mac" in # Ethernet only: the bastion knows machines by 6-byte MACs (not InfiniBand's 20)
		[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]) ;;
		*) continue ;;
		esac
		_driver=$(readlink "$_n/device/driver" 2>/dev/null)
		_driver=${_driver##*/}
		_carrier=$(read_attr "$_n/carrier")
		_speed=$(read_attr "$_n/speed")
		case "$_speed" in
		'' | -* | *[!0-9]* | 0) _speed=null ;;
		esac
		[ $_first = 1 ] || printf ', '
		_first=0
		printf '{"name": %s, "mac": %s, "driver": %s, "link": %s, "speed_mbps": %s}' \
			"$(json_text "$_name")" "$(json_str "$_mac")" "$(json_text "$_driver")" \
			"$(json_bool "$_carrier")" "$_speed"
	done
	printf ']'
}

inventory_dmi() {
	_id=$SYSFS/class/dmi/id
	printf '{"vendor": %s, "product": %s, "serial": %s, "uuid": %s, "bios_vendor": %s, "bios_version": %s}' \
		"$(json_text "$(read_attr "$_id/sys_vendor")")" "$(json_text "$(read_attr "$_id/product_name")")" \
		"$(json_text "$(read_attr "$_id/product_serial")")" "$(json_text "$(read_attr "$_id/product_uuid")")" \
		"$(json_text "$(read_attr "$_id/bios_vendor")")" "$(json_text "$(read_attr "$_id/bios_version")")"
}

inventory_firmware() {
	if [ -d "$SYSFS/firmware/efi" ]; then echo uefi; else echo bios; fi
}

# ipv4 VALUE: true when VALUE is a dotted-quad IPv4 address (four decimal octets 0-255, no leading
# zeros) other than 0.0.0.0 (what an unconfigured BMC answers).
ipv4() {
	case "$1" in
	'' | *[!0-9.]* | .* | *. | *..* | 0.0.0.0) return 1 ;;
	esac
	[ "$(printf '%s\n' "$1" | awk -F. 'NF == 4 {
		for (i = 1; i <= 4; i++) if (length($i) > 3 || $i + 0 > 255 || $i ~ /^0./) exit
		print "ok" }')" = ok ]
}

# lan_print_address: the "IP Address" of `ipmitool lan print` output on stdin, when it is an IPv4
# address (never "IP Address Source"); nothing otherwise.
lan_print_address() {
	_a=$(sed -n 's/^IP Address[ 	]*:[ 	]*//p' | head -n 1 | tr -d '\r')
	while :; do
		case "$_a" in
		*" " | *"	") _a=${_a%?} ;;
		*) break ;;
		esac
	done
	if ipv4 "$_a"; then printf '%s' "$_a"; fi
}

# IPMITOOL: Debian's ipmitool, copied into the image with its libraries (discovery.py HOST_TOOLS).
IPMITOOL=${IPMITOOL:-/opt/lab/bin/ipmitool}

# ipmi_lan_address: the BMC's LAN IPv4 address through /dev/ipmi0 (`ipmitool lan print` on
# channel 1, the usual LAN channel, then channels 2-11), or nothing.
ipmi_lan_address() {
	[ -x "$IPMITOOL" ] || return 0
	for _ch in 1 2 3 4 5 6 7 8 9 10 11; do
		_addr=$(timeout 10 "$IPMITOOL" -I open lan print "$_ch" 2>/dev/null | lan_print_address)
		if [ -n "$_addr" ]; then
			printf '%s' "$_addr"
			return 0
		fi
	done
}

# inventory_bmc: ', "bmc": {"ipmi": true}' when the machine has an IPMI BMC (the kernel's IPMI
# driver made /dev/ipmi0, or the firmware's SMBIOS table has an IPMI device record, type 38), with
# '"address": "A.B.C.D"' when ipmitool read a LAN address through /dev/ipmi0; nothing otherwise.
inventory_bmc() {
	if [ -e "$DEVDIR/ipmi0" ] || [ -e "$SYSFS/firmware/dmi/entries/38-0" ]; then
		_bmc_addr=
		[ -e "$DEVDIR/ipmi0" ] && _bmc_addr=$(ipmi_lan_address)
		if [ -n "$_bmc_addr" ]; then
			printf ', "bmc": {"ipmi": true, "address": %s}' "$(json_str "$_bmc_addr")"
		else
			printf ', "bmc": {"ipmi": true}'
		fi
	fi
}

# inventory_json: the whole hardware inventory (the shape /api/discover validates).
inventory_json() {
	printf '{"cpu": %s, "memory_mb": %s, "disks": %s, "nics": %s, "dmi": %s, "firmware": %s%s}' \
		"$(inventory_cpu)" "$(inventory_memory_mb)" "$(inventory_disks)" "$(inventory_nics)" \
		"$(inventory_dmi)" "$(json_str "$(inventory_firmware)")" "$(inventory_bmc)"
}

# discover_json MAC: the body POSTed to /api/discover.
discover_json() {
	printf '{"mac": %s, "hardware": %s}\n' "$(json_str "$1")" "$(inventory_json)"
}
