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
