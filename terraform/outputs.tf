# `terraform output -raw ansible_inventory > ../ansible/inventory/production.yml`
output "ansible_inventory" {
  description = "Ansible inventory of everything provisioned (YAML)."
  sensitive   = true
  value = yamlencode({
    all = {
      vars = {
        edgefront_bgp_password = var.bgp_password
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
