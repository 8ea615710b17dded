variable "anycast_prefix" {
  description = "Your own prefix (at least a /24) containing the anycast address in regions.toml, authorised for Vultr's AS 64515 (LOA/RPKI)."
  type        = string
}

variable "bgp_password" {
  description = "The BGP password Vultr assigns when BGP is enabled on the account."
  type        = string
  sensitive   = true
}

variable "admin_cidrs" {
  description = "Operator networks allowed to SSH and reach admin ports."
  type        = list(string)
}

variable "ssh_key_ids" {
  description = "Vultr SSH key ids installed on every server."
  type        = list(string)
}

variable "infra_domain" {
  description = "DNS zone (hosted at Vultr) for server names, e.g. nodes.example.net."
  type        = string
}

variable "vultr_locations" {
  description = "Vultr location per region code. Adding a region: add it to regions.toml, regenerate regions.json, add its location here."
  type        = map(string)
  default = {
    bom1 = "bom"
    sin1 = "sgp"
    ams1 = "ams"
    fra1 = "fra"
    lon1 = "lhr"
    nyc1 = "ewr"
    lax1 = "lax"
    gru1 = "sao"
    syd1 = "syd"
  }
}

variable "origin_plan" {
  description = "Vultr plan of the origin host (PostgreSQL primary + origin)."
  type        = string
  default     = "vc2-4c-8gb"
}

variable "origin_failover" {
  description = "Origin failover (Patroni + etcd; docs/deploy.md): regions whose replica server is also a failover candidate beside the origin host (one is enough: it is the synchronous standby), and 2 (or 4) regions whose replica server is also an etcd member beside the origin host. Both empty (the default): one primary on the origin host."
  type = object({
    candidates = list(string)
    etcd       = list(string)
  })
  default = { candidates = [], etcd = [] }
}
