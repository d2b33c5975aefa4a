"""lshmoe: communication-efficient distributed Mixture-of-Experts on torch.distributed."""

__version__ = "0.1.0"
