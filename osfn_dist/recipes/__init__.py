"""Recipes: small, tested examples of OSFN in code you own (import them or copy them)."""
