"""Expert offloading: host-tier experts, a GPU expert cache, activation-aware prefetching (MoE-Infinity)."""
