"""Developer/test environment: pinned tools and a local Kubernetes control plane."""
