"""The runtime: the canonical decoder, its parallel layers and kernels, generation and the Python APIs.

Imports the engine format and the distributed glue; never the converter."""
