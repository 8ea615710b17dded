variable "hosts" {
  description = "Each region's machines: its edge node's and its replica server's addresses."
  type = map(object({
    edge_ipv4    = string
    replica_ipv4 = string
  }))
  validation {
    condition     = alltrue(flatten([for h in values(var.hosts) : [can(cidrhost("${h.edge_ipv4}/32", 0)), can(cidrhost("${h.replica_ipv4}/32", 0))]]))
    error_message = "every address must be a single IPv4 address."
  }
}

variable "second_chance" {
  description = "Open the VXLAN tunnel between region nodes (ansible turns second chance on when another region has a node)."
  type        = bool
  default     = true
}

variable "origin_ipv4" {
  description = "The origin host's address: with origin failover it is a Patroni member, the first failover candidate and an etcd member. Read only with failover."
  type        = string
  default     = ""
}

variable "failover" {
  description = "Origin failover (Patroni + etcd; docs/deploy.md): the regions whose replica server is also a failover candidate, and those whose replica server is also an etcd member, each beside the origin host. Both empty: one primary on the origin host."
  type = object({
    candidates = list(string)
    etcd       = list(string)
  })
  default = { candidates = [], etcd = [] }
  validation {
    condition     = length(var.failover.candidates) == 0 ? length(var.failover.etcd) == 0 : contains([2, 4], length(var.failover.etcd))
    error_message = "with failover candidates, etcd names 2 or 4 distinct regions (3 or 5 members with the origin host); without, none."
  }
  validation {
    condition     = length(distinct(var.failover.candidates)) == length(var.failover.candidates) && length(distinct(var.failover.etcd)) == length(var.failover.etcd)
    error_message = "name each region once."
  }
  validation {
    condition     = !contains(var.failover.candidates, "origin") && !contains(var.failover.etcd, "origin")
    error_message = "name regions (their replica servers); the origin host is always a member."
  }
}
