"""Application-layer micro-isolation: rules on observed exchanges, enforced with nftables."""
