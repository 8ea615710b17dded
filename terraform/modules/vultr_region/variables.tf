variable "plan" {
  description = "The region's plan (outputs of modules/region_plan)."
  type = object({
    hostnames        = map(string)
    edge_firewall    = list(object({ proto = string, port = number, sources = list(string), note = string }))
    replica_firewall = list(object({ proto = string, port = number, sources = list(string), note = string }))
  })
}

variable "vultr_region" {
  description = "Vultr location id of this region (e.g. bom, sgp, ams, fra, lhr, ewr, lax, sao, syd)."
  type        = string
}

variable "edge_plan" {
  description = "Vultr plan of the edge node."
  type        = string
  default     = "vc2-2c-4gb"
}

variable "replica_plan" {
  description = "Vultr plan of the replica server."
  type        = string
  default     = "vc2-2c-4gb"
}

variable "os_id" {
  description = "Vultr OS id (2136 = Debian 12 x64)."
  type        = number
  default     = 2136
}

variable "ssh_key_ids" {
  description = "Vultr SSH key ids for ansible."
  type        = list(string)
}
