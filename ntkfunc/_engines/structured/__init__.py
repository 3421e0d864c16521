"""Implementation 3, structured derivatives: capture (which primitives consume parameters),
plan (equations and their prices, the one place routes are decided) and kernel (the tiles)."""
