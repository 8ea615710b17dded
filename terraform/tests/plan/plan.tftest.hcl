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
    origin_cidrs    = ["198.51.100.200/32"]
    hostname_suffix = "nodes.edgefront.test"
  }

  expect_failures = [var.admin_cidrs]
}
