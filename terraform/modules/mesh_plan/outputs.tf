output "rules" {
  description = "Inbound rules between the platform's machines: host (edge, replica, origin), region (empty for the origin), proto, port, source (one /32), note."
  value       = local.rules
}
