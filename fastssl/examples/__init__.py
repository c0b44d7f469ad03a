"""Example trainers that train real SSL models end to end on embedded data."""
