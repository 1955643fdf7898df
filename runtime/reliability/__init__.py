"""Every rank fails, stops and runs out of memory together; fault injection and collective-order checks."""
