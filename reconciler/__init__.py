"""Recovery loops: Postgres is the truth, so every stuck generation is found from there."""
