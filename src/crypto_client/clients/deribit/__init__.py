"""Deribit's public JSON-RPC API: the protocol (`rpc`), its HTTP transport (`http`) and errors."""
