output "edge_ipv4" {
  value = vultr_instance.edge.main_ip
}

output "replica_ipv4" {
  value = vultr_instance.replica.main_ip
}
