"""Model evaluation."""
