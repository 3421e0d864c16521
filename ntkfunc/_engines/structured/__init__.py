"""Implementation 3, structured derivatives: capture (which primitives consume parameters),
plan (equations and their prices), routes (the one place a parameter's route is decided) and
kernel (the tiles)."""
