"""Cryptographic recipes: key handles, data-key wrapping, and the sealed-file format."""
