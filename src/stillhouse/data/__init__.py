"""Loading, normalizing, filtering and splitting prompts."""
