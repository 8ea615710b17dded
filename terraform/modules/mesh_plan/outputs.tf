output "rules" {
  description = "Inbound rules between the platform's machines: key (roles and regions only, known at plan), host (edge, replica, origin), region (empty for the origin), proto, port, source (one /32), note."
  value       = local.rules
  precondition {
    condition     = alltrue([for c in concat(var.failover.candidates, var.failover.etcd) : contains(keys(var.hosts), c)])
    error_message = "failover names a region with no machines: ${join(", ", [for c in concat(var.failover.candidates, var.failover.etcd) : c if !contains(keys(var.hosts), c)])}"
  }
  precondition {
    condition     = length(var.failover.candidates) == 0 || can(cidrhost("${var.origin_ipv4}/32", 0))
    error_message = "origin failover needs origin_ipv4, the origin host's address."
  }
}
