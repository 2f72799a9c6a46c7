"""edgeroute bench harness."""
