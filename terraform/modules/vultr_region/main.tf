# One region on Vultr: the edge node (which speaks BGP to Vultr's router for
# the anycast prefix; BGP is enabled on the account, see docs/deploy.md), the
# replica server, and a firewall group per role built from the region plan.

locals {
  # One rule per (role, rule, source): Vultr rules take one subnet each.
  rules = flatten([
    for role, list in { edge = var.plan.edge_firewall, replica = var.plan.replica_firewall } : [
      for r in list : [
        for s in r.sources : {
          key = "${role}-${r.proto}-${r.port}-${s}", role = role, proto = r.proto, port = r.port, source = s, note = r.note
        }
      ]
    ]
  ])
}

resource "vultr_firewall_group" "role" {
  for_each    = var.plan.hostnames
  description = "edgefront ${each.value}"
}

resource "vultr_firewall_rule" "rule" {
  for_each          = { for r in local.rules : r.key => r }
  firewall_group_id = vultr_firewall_group.role[each.value.role].id
  protocol          = each.value.proto
  ip_type           = "v4"
  subnet            = split("/", each.value.source)[0]
  subnet_size       = tonumber(split("/", each.value.source)[1])
  port              = tostring(each.value.port)
  notes             = each.value.note
}

resource "vultr_instance" "edge" {
  region            = var.vultr_region
  plan              = var.edge_plan
  os_id             = var.os_id
  hostname          = var.plan.hostnames.edge
  label             = var.plan.hostnames.edge
  ssh_key_ids       = var.ssh_key_ids
  firewall_group_id = vultr_firewall_group.role["edge"].id
  enable_ipv6       = true
  backups           = "disabled"
  tags              = ["edgefront", "edge"]
}

resource "vultr_instance" "replica" {
  region            = var.vultr_region
  plan              = var.replica_plan
  os_id             = var.os_id
  hostname          = var.plan.hostnames.replica
  label             = var.plan.hostnames.replica
  ssh_key_ids       = var.ssh_key_ids
  firewall_group_id = vultr_firewall_group.role["replica"].id
  backups           = "enabled"
  tags              = ["edgefront", "replica"]
}
