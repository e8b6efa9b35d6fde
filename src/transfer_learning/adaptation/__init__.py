"""Domain adaptation: the method registry and one module per method."""
