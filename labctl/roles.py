"""`labctl roles`: what each role installs."""

from __future__ import annotations

import click

from labctl import output
from labctl.context import Ctx, output_option, pass_ctx

#: role -> (summary, what the install and the collection put on the machine)
ROLE_INFO = {
    "vanilla": ("OS only: no k3s, no cluster services", ["chronyd"]),
    "worker": ("k3s agent + Longhorn storage; joins an existing cluster",
               ["chronyd", "kernel modules br_netfilter, overlay", "sysctl ip_forward, inotify limits",
                "firewalld disabled", "k3s binary (agent)", "Longhorn prerequisites, /var/lib/longhorn kept on reprovision"]),
    "infra": ("k3s server + embedded etcd (control-plane node)",
              ["chronyd", "kernel modules br_netfilter, overlay", "sysctl ip_forward, inotify limits",
               "firewalld disabled", "k3s binary (server)", "/var/lib/rancher kept on reprovision"]),
    "labcontroller": ("infra + bastion + labd + CockroachDB: a self-sufficient controller",
                      ["everything infra installs", "lab-platform bastion (dnsmasq, PXE, HTTP)", "labd", "CockroachDB"]),
}


@click.command()
@output_option
@pass_ctx
def roles(obj: Ctx) -> None:
    """List the machine roles and what each installs."""
    rows = [{"role": r, "summary": s, "installs": items} for r, (s, items) in ROLE_INFO.items()]
    output.emit({"roles": rows}, obj.output,
                lambda: output.print_table(rows, [("ROLE", lambda r: r["role"]), ("SUMMARY", lambda r: r["summary"])]
                                           + ([("INSTALLS", lambda r: ", ".join(r["installs"]))] if obj.output == "wide" else [])))
