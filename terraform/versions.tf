terraform {
  required_version = ">= 1.6"
  required_providers {
    vultr = {
      source  = "vultr/vultr"
      version = "~> 2.21"
    }
  }
}

provider "vultr" {
  # VULTR_API_KEY from the environment.
  rate_limit  = 700
  retry_limit = 3
}
