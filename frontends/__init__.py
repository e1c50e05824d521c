"""Front ends: the `ddm` command line (the app is app.py, batch scripts are in scripts/)."""
