"""GPU tooling: the offline compile check and the lent-GPU script."""
