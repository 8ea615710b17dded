locals {
  code       = var.region.code
  is_primary = var.region.role == "primary"
  anycast    = var.network.anycast_ipv4

  hostnames = {
    edge    = "edge-${local.code}.${var.hostname_suffix}"
    replica = "db-${local.code}.${var.hostname_suffix}"
  }

  # Firewall of the edge node. Public: HTTP and HTTPS only. Everything else
  # from where it belongs: admin from operators, BGP and BFD only from the
  # upstream peer. Rules from the platform's other machines (the replica's
  # PostgreSQL from its region's edge, the hooks' and the tunnel between
  # edges, the origin's ports) need their real addresses: mesh_plan.
  edge_firewall = concat(
    [
      { proto = "tcp", port = 80, sources = ["0.0.0.0/0"], note = "shoppers (HTTP, ACME HTTP-01)" },
      { proto = "tcp", port = 443, sources = ["0.0.0.0/0"], note = "shoppers (HTTPS)" },
      { proto = "tcp", port = 22, sources = var.admin_cidrs, note = "SSH (ansible)" },
      { proto = "tcp", port = 9080, sources = var.admin_cidrs, note = "edge admin (health, metrics, drain)" },
      { proto = "tcp", port = 9180, sources = var.admin_cidrs, note = "health hook API (edge-ctl)" },
      { proto = "tcp", port = 179, sources = ["${var.upstream.peer_ipv4}/32"], note = "BGP from the upstream" },
    ],
    var.upstream.bfd ? [
      { proto = "udp", port = 3784, sources = ["${var.upstream.peer_ipv4}/32"], note = "BFD from the upstream" },
    ] : [],
  )

  replica_firewall = [
    { proto = "tcp", port = 22, sources = var.admin_cidrs, note = "SSH (ansible)" },
  ]

  bgp = {
    local_asn = var.network.origin_asn
    peer_asn  = var.upstream.peer_asn
    peer_ipv4 = var.upstream.peer_ipv4
    multihop  = var.upstream.multihop
    bfd       = var.upstream.bfd
    prefix    = var.anycast_prefix
    router_id = var.region.node_ipv4
  }

  dns_records = [
    { name = "edge-${local.code}", type = "A", data = var.region.node_ipv4 },
  ]

  # What ansible needs about this region's hosts (besides regions.json).
  inventory = {
    (local.hostnames.edge) = {
      edgefront_region         = local.code
      edgefront_role           = "edge"
      edgefront_anycast_prefix = var.anycast_prefix
      edgefront_bgp_peers = [{
        description = "upstream ${local.code}"
        ip          = var.upstream.peer_ipv4
        asn         = var.upstream.peer_asn
        multihop    = var.upstream.multihop
        bfd         = var.upstream.bfd
      }]
    }
  }
}
