variable "region" {
  description = "One entry of edgefront_regions from regions.json (generated from regions/regions.toml)."
  type = object({
    code        = string
    city        = string
    country     = string
    latitude    = number
    longitude   = number
    role        = string
    asn         = number
    node_ipv4   = string
    router_ipv4 = string
    nearest     = list(string)
  })
}

variable "network" {
  description = "edgefront_network from regions.json."
  type = object({
    anycast_ipv4      = string
    origin_asn        = number
    platform_domain   = string
    fiber_path_factor = number
    primary_region    = string
  })
}

variable "anycast_prefix" {
  description = "The prefix announced over BGP (your own IP space, at least a /24 on the internet) that contains the anycast address."
  type        = string
  validation {
    condition     = can(cidrhost(var.anycast_prefix, 0))
    error_message = "anycast_prefix must be a CIDR prefix such as 198.51.100.0/24."
  }
}

variable "upstream" {
  description = "The provider's BGP peer for this region (Vultr: 169.254.169.254, AS 64515, multihop 2, the account's BGP password)."
  type = object({
    peer_ipv4 = string
    peer_asn  = number
    multihop  = number
    bfd       = bool
  })
}

variable "admin_cidrs" {
  description = "Where operators reach admin ports (health hook 9180, edge admin 9080, SSH 22)."
  type        = list(string)
  validation {
    condition     = alltrue([for c in var.admin_cidrs : c != "0.0.0.0/0"])
    error_message = "admin ports must never be open to the whole internet."
  }
}

variable "hostname_suffix" {
  description = "DNS suffix of the servers, e.g. nodes.example.net."
  type        = string
}
