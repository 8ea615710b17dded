# One region on Vultr: the edge node (which speaks BGP to Vultr's router for
# the anycast prefix; BGP is enabled on the account, see docs/deploy.md), the
# replica server, and a firewall group per role built from the region plan.

locals {
  # One rule per (rule, source) pair; Vultr rules take one subnet each.
  edge_rules = flatten([
    for r in var.plan.edge_firewall : [
      for s in r.sources : { key = "${r.proto}-${r.port}-${s}", proto = r.proto, port = r.port, source = s, note = r.note }
    ]
  ])
  replica_rules = flatten([
    for r in var.plan.replica_firewall : [
      for s in r.sources : { key = "${r.proto}-${r.port}-${s}", proto = r.proto, port = r.port, source = s, note = r.note }
    ]
  ])
}

resource "vultr_firewall_group" "edge" {
  description = "edgefront ${var.plan.hostnames.edge}"
}

resource "vultr_firewall_rule" "edge" {
  for_each          = { for r in local.edge_rules : r.key => r }
  firewall_group_id = vultr_firewall_group.edge.id
  protocol          = each.value.proto
  ip_type           = "v4"
  subnet            = split("/", each.value.source)[0]
  subnet_size       = tonumber(split("/", each.value.source)[1])
  port              = tostring(each.value.port)
  notes             = each.value.note
}

resource "vultr_firewall_group" "replica" {
  description = "edgefront ${var.plan.hostnames.replica}"
}

resource "vultr_firewall_rule" "replica" {
  for_each          = { for r in local.replica_rules : r.key => r }
  firewall_group_id = vultr_firewall_group.replica.id
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
  firewall_group_id = vultr_firewall_group.edge.id
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
  firewall_group_id = vultr_firewall_group.replica.id
  backups           = "enabled"
  tags              = ["edgefront", "replica"]
}
