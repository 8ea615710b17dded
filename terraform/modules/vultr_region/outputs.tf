output "edge_ipv4" {
  value = vultr_instance.edge.main_ip
}

output "replica_ipv4" {
  value = vultr_instance.replica.main_ip
}

output "firewall_group_ids" {
  description = "The firewall group of each role (edge, replica): the root adds the rules that need other hosts' addresses."
  value       = { for role, g in vultr_firewall_group.role : role => g.id }
}
