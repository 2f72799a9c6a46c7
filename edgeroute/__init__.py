"""edgeroute: an LLM routing edge proxy."""
