# Offline check of the region logic for every region in regions.json: no
# provider, so `terraform init && terraform validate && terraform test` run
# without a registry (CI does).
terraform {
  required_version = ">= 1.6"
}

locals {
  data = jsondecode(file("${path.module}/../../regions.json"))
}

module "plan" {
  source   = "../../modules/region_plan"
  for_each = { for r in local.data.edgefront_regions : r.code => r }

  region          = each.value
  network         = local.data.edgefront_network
  anycast_prefix  = "203.0.113.0/24"
  upstream        = { peer_ipv4 = "169.254.169.254", peer_asn = 64515, multihop = 2, bfd = false }
  admin_cidrs     = ["192.0.2.0/28"]
  hostname_suffix = "nodes.edgefront.test"
}

output "regions" {
  value = keys(module.plan)
}

output "plans" {
  value = module.plan
}

# The rules between machines, with documentation addresses standing in for
# the instances' (edges at the region data's node addresses, replicas at
# .100 + their index, the origin at .200).
locals {
  codes = [for r in local.data.edgefront_regions : r.code]
  hosts = {
    for i, r in local.data.edgefront_regions : r.code => {
      edge_ipv4    = r.node_ipv4
      replica_ipv4 = cidrhost("198.51.100.0/24", 100 + i)
    }
  }
}

module "mesh" {
  source = "../../modules/mesh_plan"
  hosts  = local.hosts
}

output "hosts" {
  value = local.hosts
}

output "mesh_rules" {
  value = module.mesh.rules
}

# The same machines with origin failover: the second region's replica server
# is the second candidate, the second and third regions' replica servers
# are etcd members beside the origin host.
module "mesh_failover" {
  source      = "../../modules/mesh_plan"
  hosts       = local.hosts
  origin_ipv4 = "198.51.100.200"
  failover    = { candidates = [local.codes[1]], etcd = [local.codes[1], local.codes[2]] }
}

output "failover" {
  value = {
    rules     = module.mesh_failover.rules
    standby   = local.codes[1]
    etcd      = ["origin", local.codes[1], local.codes[2]]
    origin_ip = "198.51.100.200"
  }
}
