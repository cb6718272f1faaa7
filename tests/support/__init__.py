"""Test-only helpers (fault injection for drills), kept out of the production modules."""
