# lab-platform discovery: which modules to load (busybox awk). Used by /init.
# awk -f modules.awk PCI-MODALIASES modules.pci modules.plan  -> module names, in load order.
# modules.plan and modules.pci are written by the builder (bastion_app/images/discovery.py).
FILENAME == ARGV[1] {
	nd++; dev[nd] = $0
	v = substr($0, 6, 8); byv[v] = byv[v] " " nd
	next
}
FILENAME == ARGV[2] {
	if ($1 in hit) next
	v = substr($2, 7, 8)
	if (index(v, ".") || index(v, "*")) { for (i = 1; i <= nd; i++) if (dev[i] ~ $2) { hit[$1] = 1; break } }
	else if (v in byv) { k = split(byv[v], c, " "); for (j = 1; j <= k; j++) if (dev[c[j]] ~ $2) { hit[$1] = 1; break } }
	next
}
{ n++; name[n] = $1; kind[n] = $2; deps[n] = $3 }
END {
	for (i = n; i >= 1; i--) {
		m = name[i]
		if (kind[i] == "always" || (kind[i] == "pci" && (m in hit))) need[m] = 1
		if ((m in need) && deps[i] != "-") { k = split(deps[i], d, ","); for (j = 1; j <= k; j++) need[d[j]] = 1 }
	}
	for (i = 1; i <= n; i++) if (name[i] in need) print name[i]
}
