# The rules between the platform's own machines, from their real addresses
# (known once the instances exist) and the region data. Provider-free, so
# `terraform test` checks them offline against what each role needs
# (tests/plan). The per-region rules that need no other host's address
# (public ports, operators, the upstream's BGP) are in region_plan.
#
# Who talks to whom (ansible's roles; docs/architecture.md, trust model):
#   edge -> its region's replica, 5432 (pages, over TLS)
#   edge -> origin 5432 (read-your-writes on the primary), 8000 (proxied
#           writes, seller API), 8443 (internal API, mutual TLS)
#   replica -> origin 5432 (streaming replication)
#   edge <-> edge 9180 (the health hooks read each other's status)
#   edge <-> edge udp 4789 (second chance's VXLAN tunnel), when on
locals {
  edges    = { for code, h in var.hosts : code => h.edge_ipv4 }
  replicas = { for code, h in var.hosts : code => h.replica_ipv4 }

  # Each rule's key names roles and regions only (addresses are known only
  # after apply, and for_each keys must be known at plan).
  rules = concat(
    [for code, ip in local.edges : {
      key  = "replica-${code}-tcp-5432-from-edge-${code}"
      host = "replica", region = code, proto = "tcp", port = 5432, source = "${ip}/32",
      note = "PostgreSQL from ${code}'s edge"
    }],
    flatten([for code, ip in local.edges : [
      for port, what in { 5432 = "read-your-writes", 8000 = "writes", 8443 = "internal API" } : {
        key                    = "origin-tcp-${port}-from-edge-${code}"
        host                   = "origin", region = "", proto = "tcp", port = tonumber(port), source = "${ip}/32",
        note                   = "${what} from ${code}'s edge"
      }
    ]]),
    [for code, ip in local.replicas : {
      key  = "origin-tcp-5432-from-replica-${code}"
      host = "origin", region = "", proto = "tcp", port = 5432, source = "${ip}/32",
      note = "replication to ${code}'s replica"
    }],
    flatten([for code, ip in local.edges : [
      for peer, peer_ip in local.edges : concat(
        [{
          key  = "edge-${code}-tcp-9180-from-edge-${peer}"
          host = "edge", region = code, proto = "tcp", port = 9180, source = "${peer_ip}/32", note = "health hook of ${peer}"
        }],
        var.second_chance ? [{
          key  = "edge-${code}-udp-4789-from-edge-${peer}"
          host = "edge", region = code, proto = "udp", port = 4789, source = "${peer_ip}/32", note = "second chance from ${peer}"
        }] : [],
      ) if peer != code
    ]]),
  )
}
