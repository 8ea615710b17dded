# `terraform output -raw ansible_inventory > ../ansible/inventory/production.yml`
output "ansible_inventory" {
  description = "Ansible inventory of everything provisioned (YAML)."
  sensitive   = true
  value = yamlencode({
    all = {
      vars = {
        edgefront_bgp_password = var.bgp_password
        # site.yml refuses to run without the failover groups when set.
        edgefront_origin_failover = length(var.origin_failover.candidates) > 0
      }
      children = {
        origin = {
          hosts = {
            (vultr_instance.origin.hostname) = { ansible_host = vultr_instance.origin.main_ip }
          }
        }
        edges = {
          hosts = merge([
            for k, m in module.region : {
              for host, vars in module.plan[k].inventory : host => merge(vars, { ansible_host = m.edge_ipv4 })
            }
          ]...)
        }
        replicas = {
          hosts = {
            for k, m in module.region : module.plan[k].hostnames.replica => {
              ansible_host     = m.replica_ipv4
              edgefront_region = k
            }
          }
        }
      }
    }
  })
}

# With origin_failover: the groups etcd and db_candidates, as a second
# inventory file (a group's order matters, the origin host first, and
# yamlencode would sort it):
#   terraform output -raw ansible_failover_groups > ../ansible/inventory/production-failover.yml
output "ansible_failover_groups" {
  description = "Ansible inventory of the origin failover groups (YAML; empty without origin_failover)."
  value = length(var.origin_failover.candidates) == 0 ? "" : join("\n", concat(
    ["all:", "  children:", "    origin:", "      hosts:", "        ${vultr_instance.origin.hostname}:",
      "          edgefront_region: ${local.network.primary_region}", "    etcd:", "      hosts:",
    "        ${vultr_instance.origin.hostname}:"],
    [for code in var.origin_failover.etcd : "        ${module.plan[code].hostnames.replica}:"],
    ["    db_candidates:", "      hosts:", "        ${vultr_instance.origin.hostname}:"],
    [for code in var.origin_failover.candidates : "        ${module.plan[code].hostnames.replica}:"],
    [""],
  ))
}
