"""Connections, request/response pairing and the exchange (XPM) record."""
