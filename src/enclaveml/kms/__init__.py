"""The key broker: server (storage, service, HTTPS app) and clients."""
