"""A Deribit simulator: the public JSON-RPC endpoints this service calls, with faults on demand."""
