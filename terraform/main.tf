# edgefront on Vultr: an origin host in the primary region and, per region,
# an edge node announcing the anycast prefix over BGP plus a replica server.
# The regions come from regions.json, generated from regions/regions.toml
# (`edgefront-regions export`); the region logic is modules/region_plan,
# which needs no provider and is tested offline.

locals {
  data    = jsondecode(file("${path.module}/regions.json"))
  network = local.data.edgefront_network
  regions = { for r in local.data.edgefront_regions : r.code => r }
  missing = [for code in keys(local.regions) : code if !contains(keys(var.vultr_locations), code)]
}

resource "terraform_data" "locations_cover_regions" {
  input = local.missing
  lifecycle {
    precondition {
      condition     = length(local.missing) == 0
      error_message = "No Vultr location for region(s) ${join(", ", local.missing)}: add them to vultr_locations."
    }
  }
}

resource "vultr_firewall_group" "origin" {
  description = "edgefront origin"
}

resource "vultr_instance" "origin" {
  region            = var.vultr_locations[local.network.primary_region]
  plan              = var.origin_plan
  os_id             = 2136
  hostname          = "origin.${var.infra_domain}"
  label             = "origin.${var.infra_domain}"
  ssh_key_ids       = var.ssh_key_ids
  firewall_group_id = vultr_firewall_group.origin.id
  backups           = "enabled"
  tags              = ["edgefront", "origin"]
}

module "plan" {
  source   = "./modules/region_plan"
  for_each = local.regions

  region          = each.value
  network         = local.network
  anycast_prefix  = var.anycast_prefix
  upstream        = { peer_ipv4 = "169.254.169.254", peer_asn = 64515, multihop = 2, bfd = false }
  admin_cidrs     = var.admin_cidrs
  hostname_suffix = var.infra_domain
}

module "region" {
  source   = "./modules/vultr_region"
  for_each = local.regions

  plan         = module.plan[each.key]
  vultr_region = var.vultr_locations[each.key]
  ssh_key_ids  = var.ssh_key_ids
}

# Between the platform's machines, from their real addresses (mesh_plan:
# edges to their replica and to the origin's 5432, 8000 and 8443, replicas
# to the origin's 5432, the hooks' 9180 and second chance's VXLAN between
# edges; with origin_failover, etcd's and Patroni's ports between the
# database machines and the edges to the standby candidates); the origin's
# SSH from operators.
module "mesh" {
  source      = "./modules/mesh_plan"
  hosts       = { for k, m in module.region : k => { edge_ipv4 = m.edge_ipv4, replica_ipv4 = m.replica_ipv4 } }
  origin_ipv4 = vultr_instance.origin.main_ip
  failover    = var.origin_failover
}

locals {
  mesh_rules = concat(
    [for c in var.admin_cidrs : { key = "origin-tcp-22-from-${c}", host = "origin", region = "", proto = "tcp", port = 22, source = c, note = "SSH (ansible)" }],
    module.mesh.rules,
  )
}

resource "vultr_firewall_rule" "mesh" {
  # Keys of roles and regions (known at plan); the first apply after the
  # change from the per-port origin rules replaces them (a moment closed).
  for_each = { for r in local.mesh_rules : r.key => r }
  firewall_group_id = (each.value.host == "origin" ? vultr_firewall_group.origin.id
  : module.region[each.value.region].firewall_group_ids[each.value.host])
  protocol    = each.value.proto
  ip_type     = "v4"
  subnet      = split("/", each.value.source)[0]
  subnet_size = tonumber(split("/", each.value.source)[1])
  port        = tostring(each.value.port)
  notes       = each.value.note
}

resource "vultr_dns_domain" "infra" {
  domain = var.infra_domain
}

resource "vultr_dns_record" "edge" {
  for_each = module.region
  domain   = vultr_dns_domain.infra.id
  name     = "edge-${each.key}"
  type     = "A"
  data     = each.value.edge_ipv4
  ttl      = 300
}

resource "vultr_dns_record" "replica" {
  for_each = module.region
  domain   = vultr_dns_domain.infra.id
  name     = "db-${each.key}"
  type     = "A"
  data     = each.value.replica_ipv4
  ttl      = 300
}

# Storefronts: the platform domain and its wildcard point at the anycast address.
resource "vultr_dns_domain" "platform" {
  domain = local.network.platform_domain
  ip     = local.network.anycast_ipv4
}

resource "vultr_dns_record" "platform_wildcard" {
  domain = vultr_dns_domain.platform.id
  name   = "*"
  type   = "A"
  data   = local.network.anycast_ipv4
  ttl    = 300
}
