"""Distributed glue: launch detection, communicators (torch.distributed, shared memory), CPU binding, Ray ranks."""
