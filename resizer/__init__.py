"""Resizing: the image engine (imaging.py), jobs staged between API and workers, and the Celery tasks."""
