"""Helpers the tests share: small model files, real servers and clients."""
