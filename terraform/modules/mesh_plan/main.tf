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
# With origin failover (var.failover; the etcd and patroni roles), members
# are the origin host and every replica server:
#   etcd member <-> etcd member 2380 (peers)
#   every member -> etcd member 2379 (Patroni's DCS; etcd's own clients)
#   every member <-> every member 8008 (Patroni's REST API: the leader
#           race, and the patroni role asks the others whether a cluster
#           leads before it moves a member's data aside)
#   every member -> candidate 5432 (streaming from whichever leads)
#   edge -> candidate 5432 (read-your-writes), 8000 and 8443 (the origin
#           beside each candidate)
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
    local.failover_rules,
  )

  failover = length(var.failover.candidates) > 0
  # A member: "origin" (the origin host) or a region code (its replica
  # server); where its rules go and its address.
  member_ip = merge({ origin = var.origin_ipv4 }, local.replicas)
  target    = { for m, _ in local.member_ip : m => m == "origin" ? { host = "origin", region = "", name = "origin" } : { host = "replica", region = m, name = "replica-${m}" } }
  members   = local.failover ? keys(local.member_ip) : []
  # (A region with no machines is left out here and refused by the output's
  # precondition, with its name.)
  etcd = local.failover ? [for e in concat(["origin"], distinct(var.failover.etcd)) : e if contains(keys(local.member_ip), e)] : []
  # Candidates besides the origin host (it already takes 5432 from every
  # replica server, 5432, 8000 and 8443 from every edge).
  standbys = local.failover ? [for c in distinct(var.failover.candidates) : c if contains(keys(local.replicas), c)] : []
  failover_rules = concat(
    flatten([for e in local.etcd : [for o in local.etcd : {
      key    = "${local.target[e].name}-tcp-2380-from-etcd-${o}"
      host   = local.target[e].host, region = local.target[e].region, proto = "tcp", port = 2380,
      source = "${local.member_ip[o]}/32", note = "etcd peer ${o}"
    } if o != e]]),
    flatten([for e in local.etcd : [for m in local.members : {
      key    = "${local.target[e].name}-tcp-2379-from-member-${m}"
      host   = local.target[e].host, region = local.target[e].region, proto = "tcp", port = 2379,
      source = "${local.member_ip[m]}/32", note = "etcd client ${m}"
    } if m != e]]),
    flatten([for m in local.members : [for o in local.members : {
      key    = "${local.target[m].name}-tcp-8008-from-member-${o}"
      host   = local.target[m].host, region = local.target[m].region, proto = "tcp", port = 8008,
      source = "${local.member_ip[o]}/32", note = "Patroni of ${o}"
    } if o != m]]),
    flatten([for c in local.standbys : [for m in local.members : {
      key    = "replica-${c}-tcp-5432-from-member-${m}"
      host   = "replica", region = c, proto = "tcp", port = 5432,
      source = "${local.member_ip[m]}/32", note = "replication to ${m}"
    } if m != c]]),
    flatten([for c in local.standbys : [for e, ip in local.edges : [
      for port, what in { 5432 = "read-your-writes", 8000 = "writes", 8443 = "internal API" } : {
        key                    = "replica-${c}-tcp-${port}-from-edge-${e}"
        host                   = "replica", region = c, proto = "tcp", port = tonumber(port),
        source                 = "${ip}/32", note = "${what} from ${e}'s edge (origin failover)"
      } if !(port == "5432" && e == c)
    ]]]),
  )
}
