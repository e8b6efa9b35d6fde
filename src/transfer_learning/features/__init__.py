"""Frozen-network features: extraction, transferability scores, backbone selection."""
