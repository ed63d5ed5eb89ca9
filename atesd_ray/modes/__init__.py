"""The jobs ``mode=`` picks (``atesd_ray/main.py``): each builds its actors, runs, and writes its run directory."""
