"""Kubernetes enrichment: a watch-fed cluster index that names both ends of an exchange."""
