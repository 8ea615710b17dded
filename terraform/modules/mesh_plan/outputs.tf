output "rules" {
  description = "Inbound rules between the platform's machines: key (roles and regions only, known at plan), host (edge, replica, origin), region (empty for the origin), proto, port, source (one /32), note."
  value       = local.rules
}
