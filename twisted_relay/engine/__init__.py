"""
The relay engine: connections, fan-out, delivery policies, the write-ahead
audit log and recovery, on Twisted; no twistd, no NATS, no HTTP.
"""
