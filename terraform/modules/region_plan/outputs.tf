output "hostnames" {
  description = "Server names of this region."
  value       = local.hostnames
}

output "edge_firewall" {
  description = "Inbound rules of the edge node: proto, port, sources, note."
  value       = local.edge_firewall
}

output "replica_firewall" {
  description = "Inbound rules of the replica server."
  value       = local.replica_firewall
}

output "bgp" {
  description = "The BGP session announcing the anycast prefix from this region."
  value       = local.bgp
}

output "dns_records" {
  description = "Records under the platform's infrastructure zone."
  value       = local.dns_records
}

output "inventory" {
  description = "Host variables for ansible, keyed by host name."
  value       = local.inventory
}
