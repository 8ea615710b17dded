# Runs offline: the plan module has no provider.
run "every_region_is_planned_from_the_exported_data" {
  command = apply

  assert {
    condition     = length(output.regions) == length(jsondecode(file("../../regions.json")).edgefront_regions)
    error_message = "every region of regions.json gets a plan"
  }

  assert {
    condition     = alltrue([for p in output.plans : p.bgp.local_asn == 64500 && p.bgp.prefix == "203.0.113.0/24"])
    error_message = "every region announces the anycast prefix from the origin AS"
  }
}

run "only_http_and_https_are_public" {
  command = apply

  assert {
    condition = alltrue(flatten([
      for p in output.plans : [
        for r in p.edge_firewall : contains(r.sources, "0.0.0.0/0") ? contains([80, 443], r.port) : true
      ]
    ]))
    error_message = "only 80 and 443 may be open to everyone"
  }

  assert {
    condition = alltrue(flatten([
      for p in output.plans : [
        for r in p.replica_firewall : r.port != 5432 || !contains(r.sources, "0.0.0.0/0")
      ]
    ]))
    error_message = "PostgreSQL is never public"
  }

  assert {
    condition = alltrue(flatten([
      for p in output.plans : [for r in p.edge_firewall : r.port != 179 || r.sources == ["169.254.169.254/32"]]
    ]))
    error_message = "BGP only from the upstream peer"
  }
}

run "admin_ports_refuse_the_whole_internet" {
  command = plan

  module {
    source = "../../modules/region_plan"
  }

  variables {
    region = {
      code    = "bom1", city = "Mumbai", country = "IN", latitude = 19.07, longitude = 72.87,
      role    = "primary", asn = 65001, node_ipv4 = "198.51.100.1", router_ipv4 = "192.0.2.1",
      nearest = ["sin1"]
    }
    network = {
      anycast_ipv4      = "203.0.113.10", origin_asn = 64500, platform_domain = "shops.edgefront.test",
      fiber_path_factor = 1.4, primary_region = "bom1"
    }
    anycast_prefix  = "203.0.113.0/24"
    upstream        = { peer_ipv4 = "169.254.169.254", peer_asn = 64515, multihop = 2, bfd = false }
    admin_cidrs     = ["0.0.0.0/0"]
    hostname_suffix = "nodes.edgefront.test"
  }

  expect_failures = [var.admin_cidrs]
}

# Each role reaches what it needs, and nothing else is open between machines.
run "machines_reach_what_their_roles_need_and_nothing_else" {
  command = apply

  assert {
    condition = alltrue([
      for code, h in output.hosts : anytrue([
        for r in output.mesh_rules : r.host == "replica" && r.region == code && r.port == 5432 && r.source == "${h.edge_ipv4}/32"
      ])
    ])
    error_message = "every edge reads its region's replica"
  }

  assert {
    condition = alltrue([
      for r in output.mesh_rules : r.host == "replica" ? r.source == "${output.hosts[r.region].edge_ipv4}/32" : true
    ])
    error_message = "a replica takes nothing but its own region's edge"
  }

  assert {
    condition = alltrue(flatten([
      for code, h in output.hosts : [
        for port in [5432, 8000, 8443] : anytrue([
          for r in output.mesh_rules : r.host == "origin" && r.port == port && r.source == "${h.edge_ipv4}/32"
        ])
      ]
    ]))
    error_message = "every edge reaches the origin's PostgreSQL (read-your-writes), API and internal API"
  }

  assert {
    condition = alltrue([
      for code, h in output.hosts : anytrue([
        for r in output.mesh_rules : r.host == "origin" && r.port == 5432 && r.source == "${h.replica_ipv4}/32"
      ])
    ])
    error_message = "every replica streams from the origin"
  }

  assert {
    condition = alltrue([
      for r in output.mesh_rules : r.host == "origin" && r.port != 5432 ? contains([for h in values(output.hosts) : "${h.edge_ipv4}/32"], r.source) : true
    ])
    error_message = "the origin's API ports take only edges"
  }

  assert {
    condition = alltrue(flatten([
      for code, h in output.hosts : [
        for peer, p in output.hosts : [
          for want in [{ proto = "tcp", port = 9180 }, { proto = "udp", port = 4789 }] : anytrue([
            for r in output.mesh_rules : r.host == "edge" && r.region == code && r.proto == want.proto && r.port == want.port && r.source == "${p.edge_ipv4}/32"
          ])
        ] if peer != code
      ]
    ]))
    error_message = "edges reach each other's health hook and second chance's tunnel"
  }

  assert {
    condition     = length(distinct([for r in output.mesh_rules : r.key])) == length(output.mesh_rules)
    error_message = "every rule has a key of its own"
  }

  assert {
    condition     = alltrue([for r in output.mesh_rules : r.source != "0.0.0.0/0" && endswith(r.source, "/32")])
    error_message = "rules between machines name one machine each"
  }

  assert {
    # replica <- edge (n), origin <- edge x3 (3n), origin <- replica (n), edge <- edge x2 (2n(n-1)): nothing else.
    condition     = length(output.mesh_rules) == 5 * length(output.hosts) + 2 * length(output.hosts) * (length(output.hosts) - 1)
    error_message = "no rule beyond what the roles need"
  }
}

run "without_second_chance_no_tunnel_is_open" {
  command = plan

  module {
    source = "../../modules/mesh_plan"
  }

  variables {
    hosts = {
      bom1 = { edge_ipv4 = "198.51.100.1", replica_ipv4 = "198.51.100.101" }
      sin1 = { edge_ipv4 = "198.51.100.2", replica_ipv4 = "198.51.100.102" }
    }
    second_chance = false
  }

  assert {
    condition     = alltrue([for r in output.rules : r.proto == "tcp"])
    error_message = "no VXLAN without second chance"
  }
}

# Origin failover: every member reaches etcd, etcd members each other, the
# candidates every member's Patroni; the standby candidate takes replication
# from every member and the edges' writes, internal API and read-your-writes
# (the origin beside it); nothing else beyond the single-primary rules.
run "origin_failover_opens_what_etcd_and_patroni_need_and_nothing_else" {
  command = apply

  assert {
    condition = alltrue(flatten([
      for e in output.failover.etcd : [
        for o in output.failover.etcd : anytrue([
          for r in output.failover.rules : r.port == 2380 && (e == "origin" ? r.host == "origin" : r.host == "replica" && r.region == e)
          && r.source == "${o == "origin" ? output.failover.origin_ip : output.hosts[o].replica_ipv4}/32"
        ]) if o != e
      ]
    ]))
    error_message = "etcd members reach each other's peer port"
  }

  assert {
    condition = alltrue(flatten([
      for e in output.failover.etcd : [
        for m in concat(["origin"], keys(output.hosts)) : anytrue([
          for r in output.failover.rules : r.port == 2379 && (e == "origin" ? r.host == "origin" : r.host == "replica" && r.region == e)
          && r.source == "${m == "origin" ? output.failover.origin_ip : output.hosts[m].replica_ipv4}/32"
        ]) if m != e
      ]
    ]))
    error_message = "every Patroni member reaches every etcd member"
  }

  assert {
    condition = alltrue([
      for m in keys(output.hosts) : anytrue([
        for r in output.failover.rules : r.host == "replica" && r.region == output.failover.standby && r.port == 5432
        && r.source == "${m == output.failover.standby ? output.failover.origin_ip : output.hosts[m].replica_ipv4}/32"
      ])
    ])
    error_message = "every member can stream from the standby candidate once it leads"
  }

  assert {
    condition = alltrue(flatten([
      for code, h in output.hosts : [
        for port in [5432, 8000, 8443] : anytrue([
          for r in output.failover.rules : r.host == "replica" && r.region == output.failover.standby && r.port == port && r.source == "${h.edge_ipv4}/32"
        ])
      ]
    ]))
    error_message = "every edge reaches the standby candidate's database and the origin beside it"
  }

  assert {
    condition = alltrue([
      for r in output.failover.rules : contains([2379, 2380, 8008], r.port) ? (
        contains(concat([output.failover.origin_ip], [for h in values(output.hosts) : h.replica_ipv4]), trimsuffix(r.source, "/32"))
      ) : true
    ])
    error_message = "etcd and Patroni's ports take only database machines, never an edge"
  }

  assert {
    condition = alltrue([
      for r in output.failover.rules : r.host == "replica" && !contains(["", output.failover.standby], r.region) ? (
        r.source == "${output.hosts[r.region].edge_ipv4}/32" || contains([2379, 2380, 8008], r.port)
      ) : true
    ])
    error_message = "a replica server that is no candidate takes nothing new but etcd and Patroni's API"
  }

  assert {
    condition = alltrue(flatten([
      for m in concat(["origin"], keys(output.hosts)) : [
        for o in concat(["origin"], keys(output.hosts)) : anytrue([
          for r in output.failover.rules : r.port == 8008 && (m == "origin" ? r.host == "origin" : r.host == "replica" && r.region == m)
          && r.source == "${o == "origin" ? output.failover.origin_ip : output.hosts[o].replica_ipv4}/32"
        ]) if o != m
      ]
    ]))
    error_message = "every Patroni member reaches every other's REST API"
  }

  assert {
    condition     = length(distinct([for r in output.failover.rules : r.key])) == length(output.failover.rules)
    error_message = "every rule has a key of its own"
  }

  assert {
    # n regions, m = n + 1 members, 3 etcd, 2 candidates (the origin host and one standby):
    # 2380: 3*2; 2379: 3*(m-1); 8008 between members: m*(m-1); 5432 on the standby from
    # the other members: m-1; the standby from edges: 3n-1 (its own edge's 5432 is the
    # single-primary rule); beside the single-primary rules.
    condition     = length(output.failover.rules) == length(output.mesh_rules) + 6 + 3 * length(output.hosts) + (length(output.hosts) + 1) * length(output.hosts) + length(output.hosts) + 3 * length(output.hosts) - 1
    error_message = "no failover rule beyond what etcd and Patroni need"
  }
}

run "failover_names_only_regions_with_machines" {
  command = plan

  module {
    source = "../../modules/mesh_plan"
  }

  variables {
    hosts = {
      bom1 = { edge_ipv4 = "198.51.100.1", replica_ipv4 = "198.51.100.101" }
      sin1 = { edge_ipv4 = "198.51.100.2", replica_ipv4 = "198.51.100.102" }
    }
    origin_ipv4 = "198.51.100.200"
    failover    = { candidates = ["sin1"], etcd = ["sin1", "ams1"] }
  }

  expect_failures = [output.rules]
}
