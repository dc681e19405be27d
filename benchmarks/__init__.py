"""bench.py's rows, one module per kind of figure, and the harness they share. Part of the bench command:
its modules may import the commands they measure, and no library module imports them."""
