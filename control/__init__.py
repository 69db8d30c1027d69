"""xlb: a kernel-accelerated L4 load balancer (XDP data plane, Python control plane)."""

__version__ = "0.1.0"
