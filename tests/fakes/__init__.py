"""Stand-ins for edges that cannot run here, speaking the real wire contract."""
