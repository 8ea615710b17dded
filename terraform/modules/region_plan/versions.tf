# The region logic: built only from terraform's own language, no provider,
# so it can be initialised, validated and tested offline (CI does).
terraform {
  required_version = ">= 1.6"
}
